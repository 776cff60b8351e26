//! `shoal-bench rollout`: what prefetch on rollouts buys. N nodes (network namespaces on a bridge, links capped
//! with `tbf` as in `burst`), an agent on each in a mesh, the upstream registry behind its capped link, and the
//! fake Kubernetes API serving a Deployment. A rollout changes the Deployment's image; `--delay` seconds later (the
//! scheduler's and the kubelets' reaction) every node pulls the new image at the same moment, as the kubelets
//! would (the testbed's HTTP client doing what containerd does). Twice in one run, each with fresh agents and an
//! image of its own: without `prefetch_rollouts`, then with it. The figure is the time from the rollout to the
//! last node done.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_testbed::client::Endpoint;
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::kube::FakeApi;
use shoal_testbed::netns::{Netns, Rate};
use shoal_testbed::{Agent, ProxyStats, wait_for};

use crate::burst::{Network, burst, mesh_of_agents, percentile};

const REPO: &str = "bench/rollout";

pub(crate) const USAGE: &str = "shoal-bench rollout [--nodes 8] [--image-mib 128] [--layers 4] [--upstream-mbit 200] \
                                [--node-mbit 1000] [--delay 5] [--out PREFIX]";

/// Parameters.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    nodes: u8,
    image_mib: usize,
    layers: usize,
    upstream_mbit: u64,
    node_mbit: u64,
    delay: f64,
    out: Option<PathBuf>,
}

/// Parses the flags after `rollout`.
pub(crate) fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut a =
        Args { nodes: 8, image_mib: 128, layers: 4, upstream_mbit: 200, node_mbit: 1000, delay: 5.0, out: None };
    while let Some(flag) = args.next() {
        let v = args.next().with_context(|| format!("{flag} needs a value\nusage: {USAGE}"))?;
        match flag.as_str() {
            "--nodes" => a.nodes = v.parse()?,
            "--image-mib" => a.image_mib = v.parse()?,
            "--layers" => a.layers = v.parse()?,
            "--upstream-mbit" => a.upstream_mbit = v.parse()?,
            "--node-mbit" => a.node_mbit = v.parse()?,
            "--delay" => a.delay = v.parse()?,
            "--out" => a.out = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {flag}\nusage: {USAGE}"),
        }
    }
    if !(2..=100).contains(&a.nodes) || a.layers == 0 || a.image_mib < a.layers || a.delay < 0.0 {
        bail!("--nodes 2..=100, --layers ≥ 1, --image-mib ≥ --layers, --delay ≥ 0\nusage: {USAGE}");
    }
    Ok(a)
}

struct Outcome {
    name: &'static str,
    /// Each node's pull, seconds from the rollout.
    done: Vec<f64>,
    upstream_bytes: u64,
}

/// One contender: fresh agents (prefetch on or off), a Deployment on `before`, then the rollout to `tag`.
#[allow(clippy::too_many_arguments)]
async fn once(
    name: &'static str,
    prefetch: bool,
    args: &Args,
    nodes: &[Netns],
    api: &FakeApi,
    upstream_host: &str,
    stats: &ProxyStats,
    tag: &str,
) -> Result<Outcome> {
    eprintln!("{name}…");
    let deployment = format!("app-{tag}");
    api.put_workload("Deployment", "bench", &deployment, &[&format!("{upstream_host}/{REPO}:before")]);
    let kubeconfig = api.kubeconfig_env()?;
    let (_dir, agents) = mesh_of_agents(nodes, upstream_host, |b| {
        b.setting("prefetch_rollouts", if prefetch { "true" } else { "false" }).env("KUBECONFIG", kubeconfig)
    })
    .await?;
    if prefetch {
        wait_for("the zone's watcher to list the Deployments", Duration::from_secs(30), async || {
            agents.iter().any(|a| a.log().contains("Deployments listed"))
        })
        .await?;
    }
    stats.reset();
    let rollout = Instant::now();
    api.put_workload("Deployment", "bench", &deployment, &[&format!("{upstream_host}/{REPO}:{tag}")]);
    tokio::time::sleep(Duration::from_secs_f64(args.delay)).await;
    let since = rollout.elapsed().as_secs_f64();
    let urls: Vec<String> = agents.iter().map(Agent::url).collect();
    let done = burst(nodes, |i| Endpoint { base: urls[i].clone(), ns: Some(upstream_host.to_owned()) }, REPO, tag)
        .await?
        .into_iter()
        .map(|d| d + since)
        .collect();
    if prefetch && !agents.iter().any(|a| a.log().contains("rollout: prefetched")) {
        eprintln!("note: the prefetch had not finished when the pulls did");
    }
    Ok(Outcome { name, done, upstream_bytes: stats.body_bytes() })
}

/// Runs both contenders and prints (and writes) the table.
pub(crate) async fn run(args: Args) -> Result<()> {
    let image_bytes = (args.image_mib << 20) as u64;
    let layer = (args.image_mib << 20) / args.layers;
    let net = Network::start("shr", args.nodes, args.upstream_mbit, args.node_mbit).await?;
    let Network { bridge, nodes, registry, upstream_host, stats, .. } = &net;
    let api = FakeApi::start_at(Vec::new(), bridge.host_ip().into()).await?;
    eprintln!("pushing two {} MiB images in {} layers (over the capped link)…", args.image_mib, args.layers);
    for (seed, tag) in [(81, "without"), (82, "with")] {
        let image = Artifact::Image(Image::random(&vec![layer; args.layers], seed, "amd64", Compression::None)?);
        push(&image, &registry.host(), REPO, tag, None, Format::Oci)?;
    }
    let without = once("rollout, no prefetch", false, &args, nodes, &api, upstream_host, stats, "without").await?;
    let with = once("rollout, prefetch_rollouts", true, &args, nodes, &api, upstream_host, stats, "with").await?;
    let link_secs = image_bytes as f64 / Rate::mbit(args.upstream_mbit).bytes_per_sec();
    let mut t = format!(
        "A rollout changes a Deployment's image; {:.0} s later {} nodes pull it at the same moment. One {} MiB image \
         ({} layers) per contender; upstream link {} Mbit/s (one crossing: {link_secs:.1} s), node links {} Mbit/s; \
         fresh agents per contender.\n\n",
        args.delay, args.nodes, args.image_mib, args.layers, args.upstream_mbit, args.node_mbit
    );
    t.push_str("| contender | rollout → first node done (s) | rollout → p50 (s) | rollout → last node done (s) | the pulls alone: last (s) | upstream bytes (× image) |\n|---|---|---|---|---|---|\n");
    for o in [&without, &with] {
        let last = percentile(&o.done, 1.0);
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.1} | {last:.1} | {:.1} | {:.3}× |",
            o.name,
            percentile(&o.done, 0.0),
            percentile(&o.done, 0.5),
            last - args.delay,
            o.upstream_bytes as f64 / image_bytes as f64
        );
    }
    let _ = writeln!(
        t,
        "\nWith prefetch the last node was done {:.2}× as long after the rollout as without (same run).",
        percentile(&with.done, 1.0) / percentile(&without.done, 1.0)
    );
    println!("{t}");
    if let Some(prefix) = &args.out {
        std::fs::write(prefix.with_extension("md"), &t)?;
        eprintln!("wrote {}.md", prefix.display());
    }
    drop(net);
    Ok(())
}
