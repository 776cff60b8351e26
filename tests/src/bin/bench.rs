//! `shoal-bench`: benchmarks on the testbed that print tables and write an SVG plot. Never a timed test.
//!
//! `shoal-bench burst [--nodes 8] [--image-mib 256] …`: see the `burst` module (nodes in network namespaces).
//!
//! `shoal-bench membership [--nodes 10,25,50,100] [--idle 30]`: idle membership cost per agent as the cluster
//! grows (real agent processes), see `membership`.
//!
//! `shoal-bench load [--clients 1000] [--seconds 20] …`: one agent under many concurrent clients, see `load`.
//!
//! `shoal-bench mirror [--blob-mib 1024] [--image-mib 256] [--runs 3] [--out docs/benchmarks/mirror]`
//! 1. Cold pull: `ctr images pull` of an image through a fresh Shoal agent vs directly from upstream (fresh
//!    containerd each run, runs alternate).
//! 2. Hit throughput: a cached blob served by Shoal vs the same blob served by `docker-registry` from its own
//!    storage (runs alternate, same client).
//!
//! `shoal-bench mesh [--blob-mib 1024] [--runs 3] [--out docs/benchmarks/mesh]`
//! One blob node to node: a fresh agent B fetches it from agent A over the mesh (QUIC), vs a fresh agent B
//! fetching it from `docker-registry` over plain HTTP/TCP. Both B's write, hash and stream the blob to the same
//! client the same way, so the difference is the transport. Reports throughput and CPU seconds per GiB of the
//! sender and receiver processes together (A + B, or docker-registry + B).

#[path = "bench/burst.rs"]
mod burst;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/membership.rs"]
mod membership;
#[path = "bench/rollout.rs"]
mod rollout;
#[path = "bench/small.rs"]
mod small;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, Containerd, Registry, cpu_seconds, wait_for};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bench {
    Mirror,
    Mesh,
}

#[derive(Debug)]
struct Args {
    bench: Bench,
    blob_mib: usize,
    image_mib: usize,
    runs: usize,
    out: Option<PathBuf>,
    /// Skip the hit-throughput part.
    cold_only: bool,
    /// Skip the cold-pull part.
    hit_only: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let bench = match args.next().as_deref() {
        Some("mirror") => Bench::Mirror,
        Some("mesh") => Bench::Mesh,
        _ => bail!(
            "usage: shoal-bench mirror [--blob-mib N] [--image-mib N] [--runs N] [--out PREFIX] [--cold-only | --hit-only]\n       shoal-bench mesh [--blob-mib N] [--runs N] [--out PREFIX]\n       {}\n       {}\n       {}\n       {}\n       {}",
            burst::USAGE,
            load::USAGE,
            membership::USAGE,
            small::USAGE,
            rollout::USAGE
        ),
    };
    let mut a = Args { bench, blob_mib: 1024, image_mib: 256, runs: 3, out: None, cold_only: false, hit_only: false };
    while let Some(flag) = args.next() {
        if flag == "--cold-only" || flag == "--hit-only" {
            a.cold_only |= flag == "--cold-only";
            a.hit_only |= flag == "--hit-only";
            continue;
        }
        let v = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--blob-mib" => a.blob_mib = v.parse()?,
            "--image-mib" => a.image_mib = v.parse()?,
            "--runs" => a.runs = v.parse()?,
            "--out" => a.out = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if a.runs == 0 || a.blob_mib == 0 || a.image_mib < 4 {
        bail!("--runs and --blob-mib must be positive, --image-mib at least 4");
    }
    Ok(a)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

async fn download(http: &reqwest::Client, url: &str, expect: usize) -> Result<Duration> {
    let start = Instant::now();
    let resp = http.get(url).send().await?;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut n = 0;
    while let Some(c) = body.next().await {
        n += c?.len();
    }
    anyhow::ensure!(n == expect, "GET {url}: {n} bytes, expected {expect}");
    Ok(start.elapsed())
}

struct Row {
    name: &'static str,
    unit: &'static str,
    shoal: Vec<f64>,
    baseline: Vec<f64>,
    baseline_name: &'static str,
    higher_is_better: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("burst") => return burst::run(burst::parse(std::env::args().skip(2))?).await,
        Some("load") => return load::run(load::parse(std::env::args().skip(2))?).await,
        Some("membership") => return membership::run(membership::parse(std::env::args().skip(2))?).await,
        Some("small") => return small::run(small::parse(std::env::args().skip(2))?).await,
        Some("rollout") => return rollout::run(rollout::parse(std::env::args().skip(2))?).await,
        _ => {}
    }
    let args = parse_args()?;
    let mut rows = Vec::new();

    let registry = Registry::start().await?;
    if args.bench == Bench::Mesh {
        mesh_transfer(&args, &registry, &mut rows).await?;
        return finish(&rows, &args);
    }
    // Cold pulls first, each part after a sync: the hit part leaves gigabytes of dirty pages whose writeback
    // would otherwise land on the cold pulls' fsyncs (ext4 data=ordered ties them together).
    if !args.hit_only {
        std::process::Command::new("sync").status()?;
        cold_pull(&args, &registry, &mut rows).await?;
    }
    if !args.cold_only {
        std::process::Command::new("sync").status()?;
        hit_throughput(&args, &registry, &mut rows).await?;
    }

    finish(&rows, &args)
}

fn finish(rows: &[Row], args: &Args) -> Result<()> {
    let table = render_table(rows, args);
    println!("{table}");
    if let Some(prefix) = &args.out {
        std::fs::write(prefix.with_extension("md"), &table)?;
        std::fs::write(prefix.with_extension("svg"), render_svg(rows))?;
        eprintln!("wrote {}.md and .svg", prefix.display());
    }
    Ok(())
}

/// Streams `url` to the end while measuring the CPU time of `pids`; returns (MiB/s, CPU seconds per GiB).
async fn measured(http: &reqwest::Client, url: &str, expect: usize, pids: &[u32]) -> Result<(f64, f64)> {
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>();
    let before = cpu(pids)?;
    let took = download(http, url, expect).await?;
    let used = cpu(pids)? - before;
    let gib = expect as f64 / (1u64 << 30) as f64;
    Ok((expect as f64 / (1 << 20) as f64 / took.as_secs_f64(), used / gib))
}

/// One blob agent to agent over the mesh vs from docker-registry over HTTP/TCP, each into a fresh agent.
async fn mesh_transfer(args: &Args, registry: &Registry, rows: &mut Vec<Row>) -> Result<()> {
    eprintln!("building a {} MiB blob…", args.blob_mib);
    let big = Artifact::Image(Image::random(&[args.blob_mib << 20], 44, "amd64", Compression::None)?);
    push(&big, &registry.host(), "bench/mesh", "v1", None, Format::Oci)?;
    let layer = big.all_blobs()[1].clone();
    let size = layer.data.len();
    drop(big);
    let dir = tempfile::Builder::new().prefix("shoal-bench").tempdir()?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{:032x}", rand::random::<u128>()))?;
    let reg_pid = registry.pid().context("registry not running")?;
    let builder = || Agent::builder().registry(&registry.host()).setting("disk_budget", "\"64GiB\"");
    let a = builder().mesh(&secret, std::net::Ipv4Addr::new(127, 0, 0, 2), &[]).start().await?;
    let http = reqwest::Client::new();
    let url = |agent: &Agent| format!("{}/v2/bench/mesh/blobs/{}?ns={}", agent.url(), layer.digest, registry.host());
    download(&http, &url(&a), size).await?; // A holds it now
    let a_pid = a.pid().context("agent A not running")?;
    let bootstrap = [a.gossip_addr.context("A is in a mesh")?];
    let (mut tput_m, mut tput_t, mut cpu_m, mut cpu_t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        std::process::Command::new("sync").status()?;
        let b = builder().start().await?;
        let (t, c) = measured(&http, &url(&b), size, &[reg_pid, b.pid().context("B not running")?]).await?;
        anyhow::ensure!(b.metric("shoal_upstream_bytes_total", &[]).await? >= size as f64, "B did not use upstream");
        tput_t.push(t);
        cpu_t.push(c);
        drop(b);

        std::process::Command::new("sync").status()?;
        let b = builder().mesh(&secret, std::net::Ipv4Addr::new(127, 0, 0, 3 + run as u8), &bootstrap).start().await?;
        wait_for("A and B to see each other", Duration::from_secs(15), async || {
            a.metric("shoal_peers", &["state=\"alive\""]).await.unwrap_or(0.0) >= 1.0
                && b.metric("shoal_peers", &["state=\"alive\""]).await.unwrap_or(0.0) >= 1.0
        })
        .await?;
        // A's holding is known to the blob's home (A, or B once A re-announced to it).
        wait_for("the home to know A's holding", Duration::from_secs(10), async || {
            a.metric("shoal_directory_holders", &[]).await.unwrap_or(0.0)
                + b.metric("shoal_directory_holders", &[]).await.unwrap_or(0.0)
                >= 1.0
        })
        .await?;
        let (t, c) = measured(&http, &url(&b), size, &[a_pid, b.pid().context("B not running")?]).await?;
        let from_peers = b.metric("shoal_peer_received_bytes_total", &[]).await?;
        anyhow::ensure!(from_peers >= size as f64, "B got only {from_peers} bytes from A");
        tput_m.push(t);
        cpu_m.push(c);
        eprintln!(
            "mesh run {run}: TCP {:.0} MiB/s ({:.2} CPU s/GiB), mesh {:.0} MiB/s ({:.2} CPU s/GiB)",
            tput_t[run], cpu_t[run], tput_m[run], cpu_m[run]
        );
    }
    rows.push(Row {
        name: "blob node to node, throughput",
        unit: "MiB/s",
        shoal: tput_m,
        baseline: tput_t,
        baseline_name: "HTTP/TCP from docker-registry",
        higher_is_better: true,
    });
    rows.push(Row {
        name: "blob node to node, sender + receiver CPU",
        unit: "CPU s/GiB",
        shoal: cpu_m,
        baseline: cpu_t,
        baseline_name: "HTTP/TCP from docker-registry",
        higher_is_better: false,
    });
    Ok(())
}

/// A cold `ctr images pull` through a fresh agent vs directly from upstream.
async fn cold_pull(args: &Args, registry: &Registry, rows: &mut Vec<Row>) -> Result<()> {
    let per_layer = (args.image_mib << 20) / 4;
    let image = Artifact::Image(Image::random(&[per_layer; 4], 43, "amd64", Compression::None)?);
    push(&image, &registry.host(), "bench/image", "v1", None, Format::Oci)?;
    let reference = format!("{}/bench/image:v1", registry.host());
    let image_bytes: usize = image.all_blobs().iter().map(|b| b.data.len()).sum();
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let c = Containerd::start().await?;
        c.configure_host(&registry.host(), None)?;
        let t = Instant::now();
        let out = c.pull(&reference, None, &[]).await?;
        anyhow::ensure!(out.success, "direct pull: {}", out.output);
        b.push(t.elapsed().as_secs_f64());
        drop(c);

        let agent = Agent::builder().registry(&registry.host()).setting("disk_budget", "\"64GiB\"").start().await?;
        let c = Containerd::start().await?;
        c.configure_host(&registry.host(), Some(&agent.url()))?;
        let t = Instant::now();
        let out = c.pull(&reference, None, &[]).await?;
        anyhow::ensure!(out.success, "pull through shoal: {}", out.output);
        s.push(t.elapsed().as_secs_f64());
        let via_shoal = agent.metric("shoal_bytes_served_total", &[]).await?;
        anyhow::ensure!(via_shoal >= image_bytes as f64, "the pull bypassed shoal ({via_shoal} bytes served)");
        eprintln!("cold pull run {run}: direct {:.2}s, shoal {:.2}s", b[run], s[run]);
    }
    rows.push(Row {
        name: "cold ctr pull",
        unit: "s",
        shoal: s,
        baseline: b,
        baseline_name: "direct from upstream",
        higher_is_better: false,
    });
    Ok(())
}

/// A cached blob served by Shoal vs by `docker-registry` from its own storage.
async fn hit_throughput(args: &Args, registry: &Registry, rows: &mut Vec<Row>) -> Result<()> {
    eprintln!("building a {} MiB blob…", args.blob_mib);
    let big = Artifact::Image(Image::random(&[args.blob_mib << 20], 42, "amd64", Compression::None)?);
    push(&big, &registry.host(), "bench/big", "v1", None, Format::Oci)?;
    let layer = big.all_blobs()[1].clone();
    drop(big);
    let agent = Agent::builder().registry(&registry.host()).setting("disk_budget", "\"64GiB\"").start().await?;
    let http = reqwest::Client::new();
    let direct = format!("http://{}/v2/bench/big/blobs/{}", registry.host(), layer.digest);
    let via = format!("{}/v2/bench/big/blobs/{}?ns={}", agent.url(), layer.digest, registry.host());
    download(&http, &via, layer.data.len()).await?; // warm the cache (a cold stream-through)
    let mib = layer.data.len() as f64 / (1 << 20) as f64;
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        b.push(mib / download(&http, &direct, layer.data.len()).await?.as_secs_f64());
        s.push(mib / download(&http, &via, layer.data.len()).await?.as_secs_f64());
        eprintln!("hit run {run}: registry {:.0} MiB/s, shoal {:.0} MiB/s", b[run], s[run]);
    }
    rows.push(Row {
        name: "cached blob throughput",
        unit: "MiB/s",
        shoal: s,
        baseline: b,
        baseline_name: "docker-registry",
        higher_is_better: true,
    });
    Ok(())
}

fn render_table(rows: &[Row], args: &Args) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut t = match args.bench {
        Bench::Mirror => format!(
            "Runs per contender: {} (alternating), blob {} MiB, image {} MiB in 4 layers, loopback, {cores} cores.\n\n",
            args.runs, args.blob_mib, args.image_mib,
        ),
        Bench::Mesh => format!(
            "Runs per contender: {} (alternating), blob {} MiB into a fresh agent each run, loopback, {cores} cores.\n\n",
            args.runs, args.blob_mib,
        ),
    };
    t.push_str("| measure | Shoal (median) | baseline | baseline (median) | ratio Shoal/baseline | all Shoal runs | all baseline runs |\n");
    t.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        let (mut s, mut b) = (r.shoal.clone(), r.baseline.clone());
        let (ms, mb) = (median(&mut s), median(&mut b));
        let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
        t.push_str(&format!(
            "| {} ({}, {}) | {ms:.2} | {} | {mb:.2} | {:.3}× | {} | {} |\n",
            r.name,
            r.unit,
            if r.higher_is_better { "higher is better" } else { "lower is better" },
            r.baseline_name,
            ms / mb,
            fmt(&r.shoal),
            fmt(&r.baseline)
        ));
    }
    t
}

/// A bar chart per row: Shoal's and the baseline's median, with every run as a dot.
fn render_svg(rows: &[Row]) -> String {
    let (w, panel_h) = (640.0, 150.0);
    let h = panel_h * rows.len() as f64 + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y0 = 20.0 + panel_h * i as f64;
        let max = r.shoal.iter().chain(&r.baseline).copied().fold(0.0f64, f64::max).max(1e-9);
        svg.push_str(&format!("<text x=\"10\" y=\"{y0}\" font-weight=\"bold\">{} ({})</text>\n", r.name, r.unit));
        for (j, (label, vals, color)) in
            [("Shoal", &r.shoal, "#1f77b4"), (r.baseline_name, &r.baseline, "#ff7f0e")].into_iter().enumerate()
        {
            let mut v = vals.clone();
            let m = median(&mut v);
            let y = y0 + 20.0 + 50.0 * j as f64;
            let bw = (w - 220.0) * m / max;
            svg.push_str(&format!(
                "<text x=\"10\" y=\"{}\">{label}</text><rect x=\"170\" y=\"{y}\" width=\"{bw:.1}\" height=\"30\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{m:.2}</text>\n",
                y + 20.0,
                175.0 + bw,
                y + 20.0
            ));
            for x in vals {
                let cx = 170.0 + (w - 220.0) * x / max;
                svg.push_str(&format!("<circle cx=\"{cx:.1}\" cy=\"{}\" r=\"3\" fill=\"black\"/>\n", y + 15.0));
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}
