//! `shoal-sim --scenario NAME[,NAME…] [--seed N] [--json] [--out PREFIX]`: runs built-in scenarios and prints a
//! table (and, with `--json`, one JSON line per scenario); `--out` writes PREFIX.md and PREFIX.svg.

use anyhow::{Context, bail};
use clap::Parser;
use shoal_sim::{report, scenarios, sim};

#[derive(Debug, Parser)]
#[command(about = "Simulates a burst of N nodes running Shoal's swarm core over a modelled network")]
struct Args {
    /// Scenarios, comma-separated (or "all").
    #[arg(long, default_value = "calibrate-8")]
    scenario: String,
    /// Seed (default: the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Override the scenario's node count.
    #[arg(long)]
    nodes: Option<usize>,
    /// Override the fraction of nodes that die mid-burst (homes first, up to the scenario's number of homes).
    #[arg(long)]
    deaths: Option<f64>,
    /// Override the fraction of slow nodes.
    #[arg(long)]
    slow: Option<f64>,
    /// How downloads take pieces: `tree` (in order from sources ahead, what the agent runs) or `exchange` (out of
    /// order, rarest first, from every peer that has them).
    #[arg(long, default_value = "tree")]
    swarm: String,
    /// Print one JSON line per scenario.
    #[arg(long)]
    json: bool,
    /// Write PREFIX.md (the table) and PREFIX.svg (CDF of completion times).
    #[arg(long)]
    out: Option<String>,
    /// Instead of bursts: the membership protocol at these sizes, comma-separated (e.g. `1000,2000`).
    #[arg(long, value_delimiter = ',')]
    membership: Vec<usize>,
    /// With `--membership`: gossip to M members N times a period while there is news, as `MxN` (the agent's:
    /// 3x4).
    #[arg(long)]
    gossip: Option<String>,
    /// With `--membership`: only the minute of loss and starvation (false deaths and bytes), not the joins and
    /// crashes before it: a quicker run while working on false deaths.
    #[arg(long)]
    noise_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.membership.is_empty() {
        let mut rows = Vec::new();
        for &n in &args.membership {
            if n < 3 {
                bail!("--membership: at least 3 nodes");
            }
            eprintln!("membership: {n} nodes…");
            let started = std::time::Instant::now();
            let mut timing = shoal_sim::membership::TIMING;
            if let Some(g) = &args.gossip {
                let parsed = g.split_once('x').and_then(|(m, k)| Some((m.parse().ok()?, k.parse().ok()?)));
                timing.gossip = parsed.with_context(|| format!("--gossip {g}: expected MxN, e.g. 3x4"))?;
            }
            if args.noise_only {
                let (false_deaths, bytes) = shoal_sim::membership::noise(n, args.seed.unwrap_or(1), timing);
                println!(
                    "{n} nodes: {false_deaths} false deaths, {bytes:.0} B/node/s ({:.0} s of CPU time)",
                    started.elapsed().as_secs_f64()
                );
                continue;
            }
            let row = shoal_sim::membership::run_with(n, args.seed.unwrap_or(1), timing);
            eprintln!("  {row:?} ({:.0} s of CPU time)", started.elapsed().as_secs_f64());
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            }
            rows.push(row);
        }
        let table = shoal_sim::membership::table(&rows);
        print!("{table}");
        if let Some(prefix) = args.out {
            std::fs::write(format!("{prefix}.md"), &table).with_context(|| format!("writing {prefix}.md"))?;
        }
        return Ok(());
    }
    let names: Vec<&str> =
        if args.scenario == "all" { scenarios::NAMES.to_vec() } else { args.scenario.split(',').collect() };
    let mut reports = Vec::new();
    for name in names {
        let Some(mut p) = scenarios::scenario(name) else {
            bail!("unknown scenario {name:?}; known: {}", scenarios::NAMES.join(", "));
        };
        if let Some(seed) = args.seed {
            p.seed = seed;
        }
        if let Some(n) = args.nodes {
            p.nodes = n;
        }
        if let Some(d) = args.deaths {
            p.deaths = d;
        }
        if let Some(s) = args.slow {
            p.slow = s;
        }
        p.swarm = match args.swarm.as_str() {
            "tree" => sim::Swarm::Tree,
            "exchange" => sim::Swarm::Exchange,
            other => bail!("--swarm {other:?}: expected tree or exchange"),
        };
        eprintln!("running {name} ({} nodes)…", p.nodes);
        let r = sim::Sim::new(p).run();
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        eprintln!("{}", report::row(&r));
        reports.push(r);
    }
    let table = format!("{}\n{}\n", report::HEADER, reports.iter().map(report::row).collect::<Vec<_>>().join("\n"));
    if !args.json {
        print!("{table}");
    }
    if let Some(prefix) = args.out {
        std::fs::write(format!("{prefix}.md"), &table).with_context(|| format!("writing {prefix}.md"))?;
        std::fs::write(format!("{prefix}.svg"), report::svg(&reports))
            .with_context(|| format!("writing {prefix}.svg"))?;
    }
    Ok(())
}
