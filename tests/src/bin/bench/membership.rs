//! `shoal-bench membership`: what membership costs an idle agent as the cluster grows. For each size, N agent
//! processes (each on its own 127.0.0.x, no image traffic) start at once, bootstrapping from a list of every
//! node's gossip address (what a headless Service's DNS name gives); the bench waits until every agent sees the N−1
//! others alive (production timing: a probe per second), then measures an idle window: CPU per agent, membership message bytes per agent, open membership
//! connections, resident memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::future::join_all;
use shoal_testbed::cluster::Cluster;
use shoal_testbed::{Agent, cpu_seconds, free_port};

/// Parameters.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    nodes: Vec<usize>,
    idle_secs: u64,
    converge_timeout: u64,
    out: Option<PathBuf>,
}

pub(crate) const USAGE: &str =
    "shoal-bench membership [--nodes 10,25,50,100] [--idle 30] [--converge-timeout 300] [--out PREFIX]";

/// Parses the flags after `membership`.
pub(crate) fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args { nodes: vec![10, 25, 50, 100], idle_secs: 30, converge_timeout: 300, out: None };
    while let Some(flag) = args.next() {
        let v = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodes" => a.nodes = v.split(',').map(|n| n.trim().parse()).collect::<Result<_, _>>()?,
            "--idle" => a.idle_secs = v.parse()?,
            "--converge-timeout" => a.converge_timeout = v.parse()?,
            "--out" => a.out = Some(v.into()),
            _ => bail!("unknown flag {flag}\nusage: {USAGE}"),
        }
    }
    if a.nodes.iter().any(|&n| !(2..=250).contains(&n)) {
        bail!("--nodes: each between 2 and 250 (one 127.0.0.x per agent)\nusage: {USAGE}");
    }
    if a.idle_secs < 5 {
        bail!("--idle at least 5 seconds\nusage: {USAGE}");
    }
    Ok(a)
}

/// One cluster size's figures.
#[derive(Debug)]
struct Row {
    nodes: usize,
    /// From launching every process to every agent seeing the others alive (`None`: not within the timeout).
    converged: Option<f64>,
    /// Mean CPU per agent over the idle window, % of one core.
    cpu_pct: f64,
    /// Mean membership message bytes (sent + received) per agent per second.
    bytes_per_sec: f64,
    /// Mean and max open membership connections per agent (sampled through the window).
    conns_mean: f64,
    conns_max: f64,
    /// Mean resident memory per agent, MiB.
    rss_mib: f64,
    /// Membership connections opened per agent per second (each a handshake).
    opened_per_sec: f64,
    /// Member view changes per agent per second (suspicions, refutations; 0 in a quiet cluster).
    changes_per_sec: f64,
}

fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("malformed VmRSS")?.parse::<u64>()? << 10)
}

/// The sum of a counter over the agents.
async fn total(agents: &[Agent], name: &str) -> f64 {
    join_all(agents.iter().map(|a| a.metric(name, &[]))).await.into_iter().map(|v| v.unwrap_or(0.0)).sum()
}

async fn bytes(a: &Agent) -> f64 {
    a.metric("shoal_membership_sent_bytes_total", &[]).await.unwrap_or(0.0)
        + a.metric("shoal_membership_received_bytes_total", &[]).await.unwrap_or(0.0)
}

async fn measure(cluster: &Cluster, n: usize, args: &Args) -> Result<Row> {
    let port = free_port()?;
    eprintln!("{n} agents: starting…");
    let launched = Instant::now();
    let hosts: Vec<u8> = (1..=n).map(|i| i as u8).collect();
    let agents = cluster.start_at_once(&hosts, port, |b| b).await?;
    let want = (n - 1) as f64;
    let deadline = launched + Duration::from_secs(args.converge_timeout);
    let mut converged = None;
    while Instant::now() < deadline {
        let seen = join_all(agents.iter().map(shoal_testbed::cluster::alive)).await;
        if seen.iter().all(|&s| s == want) {
            converged = Some(launched.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match converged {
        Some(s) => eprintln!("{n} agents: converged after {s:.1} s; idle for {} s…", args.idle_secs),
        None => eprintln!("{n} agents: not converged within {} s; measuring anyway…", args.converge_timeout),
    }
    // Idle means after an agent's first minute, during which it pulls the member table every 3 s.
    let settle = Duration::from_secs(65).saturating_sub(launched.elapsed());
    tokio::time::sleep(settle).await;
    let pids: Vec<u32> = agents.iter().map(|a| a.pid().context("agent exited")).collect::<Result<_>>()?;
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect::<Result<_>>()?;
    let bytes0 = join_all(agents.iter().map(bytes)).await;
    let opened0 = total(&agents, "shoal_membership_connections_opened_total").await;
    let changes0 = total(&agents, "shoal_membership_view_changes_total").await;
    let t0 = Instant::now();
    let mut conns: Vec<f64> = Vec::new();
    let samples = 5;
    for _ in 0..samples {
        tokio::time::sleep(Duration::from_secs(args.idle_secs) / samples).await;
        let c = join_all(agents.iter().map(|a| a.metric("shoal_membership_connections", &[]))).await;
        conns.extend(c.into_iter().map(|c| c.unwrap_or(0.0)));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect::<Result<_>>()?;
    let bytes1 = join_all(agents.iter().map(bytes)).await;
    let opened = total(&agents, "shoal_membership_connections_opened_total").await - opened0;
    let changes = total(&agents, "shoal_membership_view_changes_total").await - changes0;
    let rss_total: u64 = pids.iter().map(|&p| rss(p)).collect::<Result<Vec<_>>>()?.iter().sum();
    let mean = |v: f64| v / n as f64;
    let cpu: f64 = cpu1.iter().zip(&cpu0).map(|(a, b)| a - b).sum();
    let b: f64 = bytes1.iter().zip(&bytes0).map(|(a, b)| a - b).sum();
    Ok(Row {
        nodes: n,
        converged,
        cpu_pct: mean(cpu) / secs * 100.0,
        bytes_per_sec: mean(b) / secs,
        conns_mean: conns.iter().sum::<f64>() / conns.len().max(1) as f64,
        conns_max: conns.iter().copied().fold(0.0, f64::max),
        rss_mib: mean(rss_total as f64) / f64::from(1 << 20),
        opened_per_sec: mean(opened) / secs,
        changes_per_sec: mean(changes) / secs,
    })
}

fn render_table(args: &Args, rows: &[Row]) -> String {
    let mut t = format!(
        "Idle membership cost per agent: N agent processes on this machine (127.0.0.x each, no image traffic), \
         bootstrapping from every node's address; converged = from launching all N to every agent seeing the N−1 \
         others alive; then, from a minute after launch (an agent pulls the member table every 3 s in its first \
         minute), a {} s idle window. Bytes are membership messages (probes, gossip, tables) sent + \
         received; TCP, noise and yamux framing and handshakes are not counted.\n\n\
         | nodes | converged after | CPU per agent | membership bytes per agent | connections per agent (mean / max) | connections opened per agent | view changes per agent | RSS per agent |\n\
         |---|---|---|---|---|---|---|---|\n",
        args.idle_secs
    );
    for r in rows {
        let conv =
            r.converged.map_or_else(|| format!("not within {} s", args.converge_timeout), |s| format!("{s:.1} s"));
        t.push_str(&format!(
            "| {} | {conv} | {:.2} % | {:.2} KiB/s | {:.1} / {:.0} | {:.2}/s | {:.2}/s | {:.0} MiB |\n",
            r.nodes,
            r.cpu_pct,
            r.bytes_per_sec / 1024.0,
            r.conns_mean,
            r.conns_max,
            r.opened_per_sec,
            r.changes_per_sec,
            r.rss_mib
        ));
    }
    let at = |n: usize| rows.iter().find(|r| r.nodes == n);
    if let (Some(small), Some(big)) = (at(25), at(100)) {
        t.push_str(&format!(
            "\nAt 100 nodes vs 25 (same run): CPU per agent {:.2}×, membership bytes per agent {:.2}×.\n",
            big.cpu_pct / small.cpu_pct.max(1e-9),
            big.bytes_per_sec / small.bytes_per_sec.max(1e-9)
        ));
    }
    t
}

fn render_svg(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let (w, h, left, right, top, bottom) = (640.0, 320.0, 60.0, 60.0, 40.0, 40.0);
    let max_n = rows.iter().map(|r| r.nodes).max().unwrap_or(1) as f64;
    let max_cpu = rows.iter().map(|r| r.cpu_pct).fold(0.1, f64::max) * 1.2;
    let max_kib = rows.iter().map(|r| r.bytes_per_sec / 1024.0).fold(0.1, f64::max) * 1.2;
    let x = |n: usize| left + (w - left - right) * n as f64 / max_n;
    let y = |v: f64, max: f64| h - bottom - (h - top - bottom) * v / max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-weight=\"bold\">Idle membership cost per agent vs cluster size</text>\n"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom
    );
    for (series, color, max, unit, value) in [
        ("CPU %", "#c0392b", max_cpu, "%", &(|r: &Row| r.cpu_pct) as &dyn Fn(&Row) -> f64),
        ("KiB/s", "#2471a3", max_kib, "KiB/s", &|r: &Row| r.bytes_per_sec / 1024.0),
    ] {
        let pts: Vec<String> = rows.iter().map(|r| format!("{:.1},{:.1}", x(r.nodes), y(value(r), max))).collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            pts.join(" ")
        );
        for r in rows {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{:.2} {unit}</text>",
                x(r.nodes),
                y(value(r), max),
                x(r.nodes) + 5.0,
                y(value(r), max) - 5.0,
                value(r)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{series}</text>",
            w - right + 5.0,
            y(value(rows.last().expect("rows")), max)
        );
    }
    for r in rows {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(r.nodes),
            h - bottom + 16.0,
            r.nodes
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">nodes</text>",
        (w - left - right) / 2.0 + left,
        h - 6.0
    );
    svg.push_str("</svg>\n");
    svg
}

pub(crate) async fn run(args: Args) -> Result<()> {
    let cluster = Cluster::start().await?;
    let mut rows = Vec::new();
    for &n in &args.nodes {
        rows.push(measure(&cluster, n, &args).await?);
        // The agents of this size were dropped (killed) at the end of `measure`; let the machine settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let table = render_table(&args, &rows);
    println!("{table}");
    if let Some(prefix) = &args.out {
        std::fs::write(prefix.with_extension("md"), &table)?;
        std::fs::write(prefix.with_extension("svg"), render_svg(&rows))?;
        eprintln!("wrote {}.md and .svg", prefix.display());
    }
    Ok(())
}
