//! `shoal-bench small`: the latency of a small cached object over a kept-alive connection (what containerd pays per
//! manifest, config and tiny layer), one client, sequential requests: a manifest by digest cached in the agent, vs
//! the same GET against `docker-registry` itself, in the same run.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, Registry, sha256_digest};

const REPO: &str = "bench/small";

/// Parameters.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    requests: usize,
    out: Option<std::path::PathBuf>,
}

pub(crate) const USAGE: &str = "shoal-bench small [--requests 2000] [--out PREFIX]";

/// Parses the flags after `small`.
pub(crate) fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args { requests: 2000, out: None };
    while let Some(flag) = args.next() {
        let v = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--requests" => a.requests = v.parse()?,
            "--out" => a.out = Some(v.into()),
            _ => bail!("unknown flag {flag}\nusage: {USAGE}"),
        }
    }
    if a.requests < 10 {
        bail!("--requests at least 10\nusage: {USAGE}");
    }
    Ok(a)
}

/// Latencies (seconds, sorted) of `n` sequential GETs of `url` on one kept-alive connection, each body checked.
async fn latencies(url: &str, digest: &str, n: usize) -> Result<Vec<f64>> {
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1).build()?;
    let accept = "application/vnd.oci.image.manifest.v1+json";
    // Warm-up: the connection is open and the object cached.
    for _ in 0..10 {
        http.get(url).header("accept", accept).send().await?.error_for_status()?.bytes().await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let body = http.get(url).header("accept", accept).send().await?.error_for_status()?.bytes().await?;
        out.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(sha256_digest(&body) == digest, "a body that does not match {digest}");
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let registry = Registry::start().await?;
    let image = Artifact::Image(Image::random(&[4 << 10], 701, "amd64", Compression::None)?);
    push(&image, &registry.host(), REPO, "v1", None, Format::Oci)?;
    let manifest = image.top();
    let agent = Agent::builder().registry(&registry.host()).start().await?;
    let via_agent = format!("{}/v2/{REPO}/manifests/{}?ns={}", agent.url(), manifest.digest, registry.host());
    let direct = format!("http://{}/v2/{REPO}/manifests/{}", registry.host(), manifest.digest);
    eprintln!(
        "{} sequential GETs of a {}-byte manifest on one connection, each way…",
        args.requests,
        manifest.data.len()
    );
    let shoal = latencies(&via_agent, &manifest.digest, args.requests).await?;
    let registry_only = latencies(&direct, &manifest.digest, args.requests).await?;
    let mut t = format!(
        "{} sequential GETs of a cached {}-byte manifest by digest over one kept-alive connection (loopback); \
         every body checked against its digest.\n\n| server | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|\n",
        args.requests,
        manifest.data.len()
    );
    for (name, l) in [("Shoal agent (cached)", &shoal), ("docker-registry", &registry_only)] {
        t.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} |\n",
            pct(l, 0.5) * 1e3,
            pct(l, 0.99) * 1e3,
            l[l.len() - 1] * 1e3
        ));
    }
    t.push_str(&format!(
        "\nShoal's p50 is {:.2}× docker-registry's (same run).\n",
        pct(&shoal, 0.5) / pct(&registry_only, 0.5)
    ));
    println!("{t}");
    if let Some(prefix) = &args.out {
        std::fs::write(prefix.with_extension("md"), &t)?;
        eprintln!("wrote {}.md", prefix.display());
    }
    Ok(())
}
