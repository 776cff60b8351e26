//! `shoal-bench load`: one agent under many concurrent clients (loopback). Each client loops for a bounded time,
//! fetching a blob picked at random: most from an image already cached by the agent, the rest from an image
//! nobody fetched yet (the first asks start single downloads that the others join), every body checked against
//! its digest. The same clients then run the same mix straight against `docker-registry` (the upstream), in the
//! same run, as the baseline. Reports requests, errors, latency percentiles, throughput and the agent's peak RSS.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::Rng;
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, Registry, peak_rss, sha256_digest};

const REPO: &str = "bench/load";

/// Load parameters.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    clients: usize,
    seconds: u64,
    /// Layers of each image.
    blobs: usize,
    blob_kib: usize,
    /// Share of requests for the image that was not cached before the load began.
    uncached_share: f64,
    out: Option<std::path::PathBuf>,
}

pub(crate) const USAGE: &str = "shoal-bench load [--clients 1000] [--seconds 20] [--blobs 64] [--blob-kib 256] \
                                [--uncached-share 0.2] [--out PREFIX]";

/// Parses the flags after `load`.
pub(crate) fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args { clients: 1000, seconds: 20, blobs: 64, blob_kib: 256, uncached_share: 0.2, out: None };
    while let Some(flag) = args.next() {
        let v = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--clients" => a.clients = v.parse()?,
            "--seconds" => a.seconds = v.parse()?,
            "--blobs" => a.blobs = v.parse()?,
            "--blob-kib" => a.blob_kib = v.parse()?,
            "--uncached-share" => a.uncached_share = v.parse()?,
            "--out" => a.out = Some(v.into()),
            _ => bail!("unknown flag {flag}\nusage: {USAGE}"),
        }
    }
    if a.clients == 0 || a.seconds == 0 || a.blobs == 0 || a.blob_kib == 0 || !(0.0..=1.0).contains(&a.uncached_share) {
        bail!("--clients, --seconds, --blobs, --blob-kib > 0; --uncached-share in [0, 1]\nusage: {USAGE}");
    }
    Ok(a)
}

/// What one contender's load did.
#[derive(Debug)]
struct Outcome {
    name: &'static str,
    /// Latency of every successful request, seconds.
    latencies: Vec<f64>,
    errors: usize,
    first_errors: Vec<String>,
    bytes: u64,
    elapsed: f64,
    peak_rss: Option<u64>,
}

/// The blobs of one image: (digest, size).
fn blobs(image: &Artifact) -> Vec<(String, usize)> {
    image.all_blobs().into_iter().map(|b| (b.digest.clone(), b.data.len())).collect()
}

async fn fetch(http: &reqwest::Client, url: &str, digest: &str) -> Result<u64> {
    let resp = http.get(url).send().await?;
    if !resp.status().is_success() {
        bail!("GET {url}: {}", resp.status());
    }
    let body = resp.bytes().await?;
    if sha256_digest(&body) != digest {
        bail!("GET {url}: {} bytes that do not match", body.len());
    }
    Ok(body.len() as u64)
}

/// `clients` tasks fetching from `base` until `seconds` are up.
async fn load(
    name: &'static str,
    args: &Args,
    base: String,
    query: String,
    cached: Arc<Vec<(String, usize)>>,
    uncached: Arc<Vec<(String, usize)>>,
) -> Result<Outcome> {
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(args.clients).build()?;
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let (http, base, query, cached, uncached) =
                (http.clone(), base.clone(), query.clone(), cached.clone(), uncached.clone());
            let share = args.uncached_share;
            tokio::spawn(async move {
                let (mut lat, mut errors, mut bytes) = (Vec::new(), Vec::new(), 0u64);
                while Instant::now() < until {
                    let (list, i) = {
                        let mut rng = rand::rng();
                        let list = if rng.random_bool(share) { &uncached } else { &cached };
                        (list, rng.random_range(0..list.len()))
                    };
                    let (digest, _) = &list[i];
                    let url = format!("{base}/v2/{REPO}/blobs/{digest}{query}");
                    let t = Instant::now();
                    match fetch(&http, &url, digest).await {
                        Ok(n) => {
                            lat.push(t.elapsed().as_secs_f64());
                            bytes += n;
                        }
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
                (lat, errors, bytes)
            })
        })
        .collect();
    let mut out = Outcome {
        name,
        latencies: Vec::new(),
        errors: 0,
        first_errors: Vec::new(),
        bytes: 0,
        elapsed: 0.0,
        peak_rss: None,
    };
    for t in tasks {
        let (lat, errors, bytes) = t.await?;
        out.latencies.extend(lat);
        out.errors += errors.len();
        out.first_errors.extend(errors.into_iter().take(2));
        out.bytes += bytes;
    }
    out.first_errors.truncate(5);
    out.elapsed = start.elapsed().as_secs_f64();
    out.latencies.sort_by(f64::total_cmp);
    Ok(out)
}

/// Runs the load against the agent, then against the registry, and prints (and writes) the table and plot.
pub(crate) async fn run(args: Args) -> Result<()> {
    let registry = Registry::start().await?;
    let layers = vec![args.blob_kib << 10; args.blobs];
    let warm = Artifact::Image(Image::random(&layers, 501, "amd64", Compression::None)?);
    let cold = Artifact::Image(Image::random(&layers, 502, "amd64", Compression::None)?);
    eprintln!("pushing two images of {} × {} KiB…", args.blobs, args.blob_kib);
    push(&warm, &registry.host(), REPO, "warm", None, Format::Oci)?;
    push(&cold, &registry.host(), REPO, "cold", None, Format::Oci)?;
    let (warm, cold) = (Arc::new(blobs(&warm)), Arc::new(blobs(&cold)));

    let agent = Agent::builder().registry(&registry.host()).start().await?;
    let query = format!("?ns={}", registry.host());
    // Cache the warm image in the agent first.
    let http = reqwest::Client::builder().no_proxy().build()?;
    for (d, _) in warm.iter() {
        fetch(&http, &format!("{}/v2/{REPO}/blobs/{d}{query}", agent.url()), d).await?;
    }
    eprintln!("{} clients for {} s against the agent…", args.clients, args.seconds);
    let mut shoal = load("Shoal agent", &args, agent.url(), query, warm.clone(), cold.clone()).await?;
    shoal.peak_rss = agent.pid().map(peak_rss).transpose()?;
    eprintln!("{} clients for {} s against docker-registry…", args.clients, args.seconds);
    let mut direct =
        load("docker-registry (direct)", &args, format!("http://{}", registry.host()), String::new(), warm, cold)
            .await?;
    direct.peak_rss = registry.pid().map(peak_rss).transpose()?;
    let outcomes = [shoal, direct];
    let table = render_table(&args, &outcomes);
    println!("{table}");
    for o in &outcomes {
        for e in &o.first_errors {
            eprintln!("{}: {e}", o.name);
        }
    }
    if let Some(prefix) = &args.out {
        std::fs::write(prefix.with_extension("md"), &table)?;
        std::fs::write(prefix.with_extension("svg"), render_svg(&outcomes))?;
        eprintln!("wrote {}.md and .svg", prefix.display());
    }
    Ok(())
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn render_table(args: &Args, outcomes: &[Outcome]) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut t = format!(
        "{} concurrent clients for {} s each, loopback, {cores} cores; blobs of {} KiB, {:.0} % of requests for an \
         image not cached when the load began ({} blobs), the rest for a cached one ({} blobs); every body checked \
         against its digest. Latency is request to last byte.\n\n",
        args.clients,
        args.seconds,
        args.blob_kib,
        args.uncached_share * 100.0,
        args.blobs,
        args.blobs
    );
    t.push_str("| target | requests | errors | requests/s | MiB/s | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | peak RSS (MiB) |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for o in outcomes {
        let l = &o.latencies;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            o.name,
            l.len() + o.errors,
            o.errors,
            l.len() as f64 / o.elapsed,
            o.bytes as f64 / f64::from(1 << 20) / o.elapsed,
            pct(l, 0.5) * 1e3,
            pct(l, 0.9) * 1e3,
            pct(l, 0.99) * 1e3,
            pct(l, 1.0) * 1e3,
            o.peak_rss.map_or("–".into(), |m| format!("{:.0}", m as f64 / f64::from(1 << 20))),
        );
    }
    if let [shoal, direct] = outcomes {
        let _ = writeln!(
            t,
            "\nShoal / docker-registry (same run): throughput {:.2}×, p50 {:.2}×, p99 {:.2}×.",
            (shoal.latencies.len() as f64 / shoal.elapsed) / (direct.latencies.len() as f64 / direct.elapsed),
            pct(&shoal.latencies, 0.5) / pct(&direct.latencies, 0.5),
            pct(&shoal.latencies, 0.99) / pct(&direct.latencies, 0.99),
        );
    }
    t
}

/// Latency percentiles (p50, p90, p99, max) per target as bars, on a log scale.
fn render_svg(outcomes: &[Outcome]) -> String {
    let (w, lane) = (720.0, 110.0);
    let h = lane * outcomes.len() as f64 + 50.0;
    let max_ms = outcomes.iter().map(|o| pct(&o.latencies, 1.0) * 1e3).fold(1.0, f64::max);
    let scale = |ms: f64| 180.0 + (w - 220.0) * (ms.max(0.1) / 0.1).ln() / (max_ms / 0.1).ln();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-weight=\"bold\">Request latency (ms, log scale)</text>\n"
    );
    for (i, o) in outcomes.iter().enumerate() {
        let y0 = 35.0 + lane * i as f64;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{}</text>", y0 + 12.0, o.name);
        for (j, (label, q)) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)].into_iter().enumerate() {
            let ms = pct(&o.latencies, q) * 1e3;
            let y = y0 + 20.0 + 20.0 * j as f64;
            let _ = writeln!(
                svg,
                "<text x=\"130\" y=\"{}\">{label}</text><rect x=\"180\" y=\"{y}\" width=\"{:.1}\" height=\"14\" fill=\"#1f77b4\"/><text x=\"{:.1}\" y=\"{}\">{ms:.1}</text>",
                y + 11.0,
                scale(ms) - 180.0,
                scale(ms) + 5.0,
                y + 11.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
