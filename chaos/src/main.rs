//! `shoal-chaos`: runs the fault scenarios (see the library) and prints what each found.
//!
//! ```text
//! shoal-chaos run <scenario|all> [--seed N] [--long]   one run of each named scenario
//! shoal-chaos soak --minutes N [--out FILE]              scenarios in turn, long size, fresh seeds, until time is up
//! shoal-chaos list                                        the scenarios
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_chaos::report::table;
use shoal_chaos::{Report, Scenario, Size};

const USAGE: &str = "usage: shoal-chaos run <scenario|all> [--seed N] [--long] | soak --minutes N [--out FILE] | list";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(std::env::args().skip(1).collect()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("shoal-chaos: {e:#}\n{USAGE}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Ok(true) when every run kept every invariant.
async fn run(args: Vec<String>) -> Result<bool> {
    let mut it = args.into_iter();
    let command = it.next().context("no command")?;
    let mut which = None;
    let (mut seed, mut size, mut minutes, mut out) = (None, Size::Short, None, None);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => seed = Some(it.next().context("--seed needs a value")?.parse()?),
            "--long" => size = Size::Long,
            "--minutes" => minutes = Some(it.next().context("--minutes needs a value")?.parse::<f64>()?),
            "--out" => out = Some(it.next().context("--out needs a file")?),
            _ if which.is_none() && !a.starts_with("--") => which = Some(a),
            _ => bail!("unexpected argument {a:?}"),
        }
    }
    let scenarios = match which.as_deref() {
        None | Some("all") => Scenario::ALL.to_vec(),
        Some(name) => vec![Scenario::parse(name)?],
    };
    let mut reports = Vec::new();
    match command.as_str() {
        "list" => {
            for s in Scenario::ALL {
                println!("{}", s.name());
            }
            return Ok(true);
        }
        "run" => {
            let seed = seed.unwrap_or_else(rand::random);
            for s in scenarios {
                reports.push(one(s, seed, size).await?);
            }
        }
        "soak" => {
            let minutes = minutes.context("soak needs --minutes")?;
            let until = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
            while Instant::now() < until {
                for s in &scenarios {
                    reports.push(one(*s, rand::random(), Size::Long).await?);
                    if Instant::now() >= until {
                        break;
                    }
                }
            }
        }
        _ => bail!("unknown command {command:?}"),
    }
    let t = table(&reports);
    println!("\n{t}");
    if let Some(path) = out {
        std::fs::write(&path, &t).with_context(|| format!("writing {path}"))?;
    }
    Ok(reports.iter().all(|r| r.verdict().is_ok()))
}

async fn one(s: Scenario, seed: u64, size: Size) -> Result<Report> {
    eprintln!("== {} seed {seed} ({size:?})", s.name());
    let report = s.run(seed, size).await.with_context(|| format!("{} seed {seed} could not run", s.name()))?;
    println!("{}", report.summary());
    if let Err(e) = report.verdict() {
        println!("FAILED: {e:#}\nreplay: shoal-chaos run {} --seed {seed}{}", s.name(), long_flag(size));
    }
    Ok(report)
}

fn long_flag(size: Size) -> &'static str {
    match size {
        Size::Short => "",
        Size::Long => " --long",
    }
}
