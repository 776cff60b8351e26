//! `shoal-bench burst`: N nodes pull the same image at the same moment, four contenders in one run on one
//! topology (each node, the upstream and the central cache in its own network namespace on a bridge, links capped
//! with `tbf`):
//! (a) every node pulls directly from upstream; (b) every node pulls through one `docker-registry` in `proxy:`
//! mode (the usual central pull-through cache); (c) every node pulls through its own Shoal agent, the agents
//! forming a mesh, trading pieces out of order (`swarm = "exchange"`, the default); (d) the same, pieces in order
//! (`swarm = "tree"`). The pulls are the testbed's HTTP client doing what containerd does (HEAD the tag, GET the
//! manifest, config and layers three at a time, every digest checked), run inside each node's namespace.
//! Upstream bytes are response body bytes counted by the proxy in front of the registry, inside the upstream's
//! namespace.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_testbed::client::{self, Endpoint};
use shoal_testbed::cluster::write_secret;
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::netns::{Bridge, Netns, Rate};
use shoal_testbed::{Agent, NsProxy, ProxyStats, Registry, cpu_seconds, peak_rss, wait_for};

const REPO: &str = "bench/burst";
const UPSTREAM_NS: u8 = 1;
const CACHE_NS: u8 = 2;
const FIRST_NODE: u8 = 11;

/// Burst parameters.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    nodes: u8,
    image_mib: usize,
    layers: usize,
    upstream_mbit: u64,
    node_mbit: u64,
    out: Option<PathBuf>,
    /// Only the Shoal contender (for trying changes; published figures always have the baselines).
    shoal_only: bool,
    /// One node pulls the image first, alone; the others then burst (Shoal: with complete holders in the mesh).
    warm: bool,
}

pub(crate) const USAGE: &str = "shoal-bench burst [--nodes 8] [--image-mib 256] [--layers 4] [--upstream-mbit 200] \
                         [--node-mbit 1000] [--out PREFIX] [--shoal-only] [--warm]";

impl Args {
    /// Sets the flag that takes a value.
    fn set(&mut self, flag: &str, v: &str) -> Result<()> {
        match flag {
            "--nodes" => self.nodes = v.parse()?,
            "--image-mib" => self.image_mib = v.parse()?,
            "--layers" => self.layers = v.parse()?,
            "--upstream-mbit" => self.upstream_mbit = v.parse()?,
            "--node-mbit" => self.node_mbit = v.parse()?,
            "--out" => self.out = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {flag}\nusage: {USAGE}"),
        }
        Ok(())
    }
}

/// Parses the flags after `burst`.
pub(crate) fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        nodes: 8,
        image_mib: 256,
        layers: 4,
        upstream_mbit: 200,
        node_mbit: 1000,
        out: None,
        shoal_only: false,
        warm: false,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--shoal-only" => a.shoal_only = true,
            "--warm" => a.warm = true,
            _ => {
                let v = args.next().with_context(|| format!("{flag} needs a value"))?;
                a.set(&flag, &v)?;
            }
        }
    }
    if !((2 + u8::from(a.warm))..=200).contains(&a.nodes)
        || a.layers == 0
        || a.image_mib < a.layers
        || a.upstream_mbit == 0
        || a.node_mbit == 0
    {
        bail!("--nodes 2..=200, --layers ≥ 1, --image-mib ≥ --layers, rates > 0\nusage: {USAGE}");
    }
    Ok(a)
}

/// One contender's run.
#[derive(Debug)]
struct Outcome {
    name: &'static str,
    /// Completion time of each node's pull, seconds from the common start.
    done: Vec<f64>,
    upstream_bytes: u64,
    peer_bytes: Option<u64>,
    peak_memory: Option<u64>,
    /// CPU seconds the agents used during the burst.
    cpu_seconds: Option<f64>,
}

/// With `warm`, node 0 pulls alone first and the others burst after it (their times are the outcome);
/// otherwise every node bursts.
async fn pulls(warm: bool, nodes: &[Netns], endpoint: impl Fn(usize) -> Endpoint) -> Result<Vec<f64>> {
    if !warm {
        return burst(nodes, endpoint, REPO, "v1").await;
    }
    burst(&nodes[..1], &endpoint, REPO, "v1").await?;
    burst(&nodes[1..], |i| endpoint(i + 1), REPO, "v1").await
}

/// Pulls `repo:tag` on every node at the same moment (each node's thread is in its namespace with its client built
/// before the start is given); returns each node's completion time from that start.
pub(crate) async fn burst(
    nodes: &[Netns],
    endpoint: impl Fn(usize) -> Endpoint,
    repo: &'static str,
    tag: &str,
) -> Result<Vec<f64>> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(nodes.len() + 1));
    let handles: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (ep, start, tag) = (endpoint(i), start.clone(), tag.to_owned());
            ns.spawn(move || async move {
                let http = reqwest::Client::builder().no_proxy().build();
                start.wait().await;
                let began = Instant::now();
                client::pull(&http?, &ep, repo, &tag).await?;
                Ok(began.elapsed().as_secs_f64())
            })
        })
        .collect();
    // A thread that could not enter its namespace never reaches the start: do not wait for it forever.
    if tokio::time::timeout(Duration::from_secs(30), start.wait()).await.is_err() {
        for (i, h) in handles.into_iter().enumerate() {
            if h.is_finished() {
                h.await?.with_context(|| format!("node {i} did not start"))?;
            }
        }
        bail!("not every node reached the start");
    }
    let mut done = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        done.push(h.await?.with_context(|| format!("pull on node {i}"))?);
    }
    Ok(done)
}

/// Runs the four contenders and prints (and writes) the table and the plot.
pub(crate) async fn run(args: Args) -> Result<()> {
    let image_bytes = (args.image_mib << 20) as u64;
    let layer = (args.image_mib << 20) / args.layers;
    eprintln!("building a {} MiB image in {} layers…", args.image_mib, args.layers);
    let image = Artifact::Image(Image::random(&vec![layer; args.layers], 77, "amd64", Compression::None)?);
    let net = Network::start("shb", args.nodes, args.upstream_mbit, args.node_mbit).await?;
    let Network { bridge, nodes, registry, upstream_host, stats, .. } = &net;
    let cache_ns = bridge.netns(CACHE_NS, Some(Rate::mbit(args.node_mbit)))?;
    eprintln!("pushing it to upstream (over the capped link)…");
    push(&image, &registry.host(), REPO, "v1", None, Format::Oci)?;

    let mut outcomes = Vec::new();

    if args.shoal_only {
        return shoal_only(&args, nodes, upstream_host, stats, image_bytes).await;
    }
    eprintln!("(a) direct from upstream…");
    stats.reset();
    let done = pulls(args.warm, nodes, |_| Endpoint { base: format!("http://{upstream_host}"), ns: None }).await?;
    outcomes.push(Outcome {
        name: "direct",
        done,
        upstream_bytes: stats.body_bytes(),
        peer_bytes: None,
        peak_memory: None,
        cpu_seconds: None,
    });

    eprintln!("(b) through a central pull-through cache…");
    stats.reset();
    let cache = Registry::start_in(&cache_ns, 5000, Some(&format!("http://{upstream_host}"))).await?;
    let cache_url = format!("http://{}", cache.addr());
    let done = pulls(args.warm, nodes, |_| Endpoint { base: cache_url.clone(), ns: None }).await?;
    outcomes.push(Outcome {
        name: "central cache (docker-registry proxy)",
        done,
        upstream_bytes: stats.body_bytes(),
        peer_bytes: None,
        peak_memory: cache.pid().map(peak_rss).transpose()?,
        cpu_seconds: None,
    });
    drop(cache);

    for swarm in SWARMS {
        outcomes.push(shoal(args.warm, nodes, upstream_host, stats, swarm).await?);
    }

    let link_secs = image_bytes as f64 / Rate::mbit(args.upstream_mbit).bytes_per_sec();
    write_out(&args, &outcomes, image_bytes, link_secs)?;
    drop(cache_ns);
    drop(net);
    Ok(())
}

/// The bench's network: a bridge, the upstream namespace (the registry on its address behind a counting proxy, its
/// link capped) and the nodes' namespaces (their links capped). Dropped in the order it must be torn down.
pub(crate) struct Network {
    /// Counts what crosses the upstream link (read through `stats`).
    _proxy: NsProxy,
    pub(crate) stats: ProxyStats,
    pub(crate) registry: Registry,
    /// `ip:port` of the proxy, the upstream the nodes see.
    pub(crate) upstream_host: String,
    pub(crate) nodes: Vec<Netns>,
    /// The upstream's namespace (the registry and the proxy run in it).
    _up: Netns,
    pub(crate) bridge: Bridge,
}

impl Network {
    /// Creates it on bridge `<prefix>br`.
    pub(crate) async fn start(prefix: &str, nodes: u8, upstream_mbit: u64, node_mbit: u64) -> Result<Self> {
        let bridge = Bridge::create(prefix)?;
        let up = bridge.netns(UPSTREAM_NS, Some(Rate::mbit(upstream_mbit)))?;
        let nodes: Vec<Netns> =
            (0..nodes).map(|i| bridge.netns(FIRST_NODE + i, Some(Rate::mbit(node_mbit)))).collect::<Result<_>>()?;
        let registry = Registry::start_in(&up, 5001, None).await?;
        let upstream_host = format!("{}:5000", up.ip());
        let proxy = NsProxy::start(&up, upstream_host.parse()?, registry.addr()).await?;
        let stats = proxy.stats().clone();
        Ok(Self { _proxy: proxy, stats, registry, upstream_host, nodes, _up: up, bridge })
    }
}

/// An agent per node (`configure` adds settings), in one mesh through the first, once every agent sees all the
/// others. The directory holds the mesh's secret: keep it as long as the agents.
pub(crate) async fn mesh_of_agents(
    nodes: &[Netns],
    upstream_host: &str,
    configure: impl Fn(shoal_testbed::AgentBuilder) -> shoal_testbed::AgentBuilder,
) -> Result<(tempfile::TempDir, Vec<Agent>)> {
    let dir = tempfile::Builder::new().prefix("shoal-bench").tempdir()?;
    let secret = write_secret(&dir, "secret", &format!("{:032x}", rand::random::<u128>()))?;
    let mut agents: Vec<Agent> = Vec::new();
    for ns in nodes {
        let boot: Vec<_> = agents.first().and_then(|a| a.gossip_addr).into_iter().collect();
        let builder = Agent::builder().registry(upstream_host).mesh(&secret, ns.ip(), &boot).netns(ns);
        agents.push(configure(builder).start().await?);
    }
    let n = (nodes.len() - 1) as f64;
    wait_for("every agent to see the others", Duration::from_secs(60), async || {
        for a in &agents {
            if a.metric("shoal_peers", &["state=\"alive\""]).await.unwrap_or(0.0) != n {
                return false;
            }
        }
        true
    })
    .await?;
    Ok((dir, agents))
}

/// The Shoal contender: an agent per node, in a mesh, each node pulling through its own.
/// How the Shoal contenders' agents take pieces from each other (`swarm`).
const SWARMS: [(&str, &str); 2] = [("exchange", "Shoal (exchange)"), ("tree", "Shoal (tree)")];

async fn shoal(
    warm: bool,
    nodes: &[Netns],
    upstream_host: &str,
    stats: &ProxyStats,
    (swarm, name): (&str, &'static str),
) -> Result<Outcome> {
    eprintln!("through Shoal on every node, swarm = {swarm}…");
    stats.reset();
    let (_dir, agents) = mesh_of_agents(nodes, upstream_host, |b| b.setting("swarm", &format!("\"{swarm}\""))).await?;
    let urls: Vec<String> = agents.iter().map(Agent::url).collect();
    let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let done = pulls(warm, nodes, |i| Endpoint { base: urls[i].clone(), ns: Some(upstream_host.to_owned()) }).await?;
    let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()? - cpu_before;
    let mut peer_bytes = 0.0;
    let mut memory = 0;
    for a in &agents {
        peer_bytes += a.metric("shoal_peer_received_bytes_total", &[]).await?;
        memory = memory.max(a.pid().map(peak_rss).transpose()?.unwrap_or(0));
    }
    Ok(Outcome {
        name,
        done,
        upstream_bytes: stats.body_bytes(),
        peer_bytes: Some(peer_bytes as u64),
        peak_memory: Some(memory),
        cpu_seconds: Some(cpu),
    })
}

async fn shoal_only(
    args: &Args,
    nodes: &[Netns],
    upstream_host: &str,
    stats: &ProxyStats,
    image_bytes: u64,
) -> Result<()> {
    let mut outcomes = Vec::new();
    for swarm in SWARMS {
        outcomes.push(shoal(args.warm, nodes, upstream_host, stats, swarm).await?);
    }
    let link_secs = image_bytes as f64 / Rate::mbit(args.upstream_mbit).bytes_per_sec();
    write_out(args, &outcomes, image_bytes, link_secs)
}

/// Prints the table, and with `--out` writes it and the plot.
fn write_out(args: &Args, outcomes: &[Outcome], image_bytes: u64, link_secs: f64) -> Result<()> {
    let table = render_table(args, outcomes, image_bytes, link_secs);
    println!("{table}");
    if let Some(prefix) = &args.out {
        std::fs::write(prefix.with_extension("md"), &table)?;
        std::fs::write(prefix.with_extension("svg"), render_svg(outcomes, link_secs))?;
        eprintln!("wrote {}.md and .svg", prefix.display());
    }
    Ok(())
}

pub(crate) fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * p).round() as usize;
    s[i]
}

fn render_table(args: &Args, outcomes: &[Outcome], image_bytes: u64, link_secs: f64) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let who = if args.warm {
        format!(
            "One node pulls one {} MiB image ({} layers) alone, then {} nodes pull it at the same moment (their times \
                 below)",
            args.image_mib,
            args.layers,
            args.nodes - 1
        )
    } else {
        format!(
            "{} nodes pull one {} MiB image ({} layers) at the same moment",
            args.nodes, args.image_mib, args.layers
        )
    };
    let mut t = format!(
        "{who}; upstream link {} Mbit/s, node links {} Mbit/s (tbf, both directions); {cores} cores. The image crosses \
         the upstream link once in {link_secs:.1} s (at the link rate, no overhead): the reference for completion \
         times.\n\n",
        args.upstream_mbit, args.node_mbit
    );
    t.push_str("| contender | first done (s) | p50 (s) | last done (s) | last / one upstream crossing | upstream bytes (× image) | peer bytes (× image) | peak memory (MiB) | agents' CPU (s) |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let x = |b: u64| b as f64 / image_bytes as f64;
    for o in outcomes {
        let last = percentile(&o.done, 1.0);
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.1} | {last:.1} | {:.2}× | {:.3}× | {} | {} | {} |",
            o.name,
            percentile(&o.done, 0.0),
            percentile(&o.done, 0.5),
            last / link_secs,
            x(o.upstream_bytes),
            o.peer_bytes.map_or("–".into(), |b| format!("{:.2}×", x(b))),
            o.peak_memory.map_or("–".into(), |m| format!("{:.0}", m as f64 / f64::from(1 << 20))),
            o.cpu_seconds.map_or("–".into(), |c| format!("{c:.1}")),
        );
    }
    let by_name = |n: &str| outcomes.iter().find(|o| o.name == n);
    let last = |o: &Outcome| percentile(&o.done, 1.0);
    for (_, name) in SWARMS {
        if let (Some(shoal), Some(direct)) = (by_name(name), by_name("direct")) {
            let _ = writeln!(
                t,
                "\n{name}: last node in {:.2}× the time of direct pulls' last node (same run).",
                last(shoal) / last(direct)
            );
        }
    }
    if let (Some(ex), Some(tree)) = (by_name(SWARMS[0].1), by_name(SWARMS[1].1)) {
        let _ = writeln!(
            t,
            "\nExchange vs tree (same run): last node {:.2}×, p50 {:.2}×.",
            last(ex) / last(tree),
            percentile(&ex.done, 0.5) / percentile(&tree.done, 0.5)
        );
    }
    t
}

/// Completion time of every node, one lane per contender, with the one-crossing reference as a line.
fn render_svg(outcomes: &[Outcome], link_secs: f64) -> String {
    let (w, lane) = (720.0, 60.0);
    let (left, right) = (260.0, 30.0);
    let h = lane * outcomes.len() as f64 + 70.0;
    let max = outcomes.iter().flat_map(|o| o.done.iter()).copied().fold(link_secs, f64::max) * 1.05;
    let sx = |s: f64| left + (w - left - right) * s / max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-weight=\"bold\">Completion time per node (s)</text>\n"
    );
    let colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"];
    for (i, o) in outcomes.iter().enumerate() {
        let y = 40.0 + lane * i as f64 + lane / 2.0;
        let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">{}</text>", y + 4.0, o.name);
        let _ = writeln!(svg, "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>", w - right);
        for (j, d) in o.done.iter().enumerate() {
            let jitter = (j % 5) as f64 * 4.0 - 8.0;
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{}\" fill-opacity=\"0.7\"/>",
                sx(*d),
                y + jitter,
                colors[i % colors.len()]
            );
        }
    }
    let axis_y = 40.0 + lane * outcomes.len() as f64 + 5.0;
    let _ =
        writeln!(svg, "<line x1=\"{left}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>", w - right);
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0].into_iter().find(|s| max / s <= 10.0).unwrap_or(300.0);
    let mut tick = 0.0;
    while tick <= max {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{tick:.0}</text>",
            sx(tick),
            axis_y + 15.0
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{0:.1}\" y1=\"30\" x2=\"{0:.1}\" y2=\"{axis_y}\" stroke=\"green\" stroke-dasharray=\"4\"/><text x=\"{0:.1}\" y=\"{1}\" fill=\"green\" text-anchor=\"middle\">image over the upstream link once</text>",
        sx(link_secs),
        axis_y + 30.0
    );
    svg.push_str("</svg>\n");
    svg
}
