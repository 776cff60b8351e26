//! What a scenario run found, the verdict on its invariants, and the table of many runs.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::bed::PullRecord;

/// One run of one scenario.
#[derive(Debug, Default)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Pulls made.
    pub pulls: usize,
    /// Pulls that needed more than one attempt.
    pub retried: usize,
    /// Pulls that did not finish, with why.
    pub failed: Vec<String>,
    /// Complete bodies that did not match their digest (must be 0).
    pub corrupt: usize,
    /// Blobs in the stores at the end.
    pub stored_blobs: u64,
    /// Store entries that disagree with their files or names (must be none).
    pub store_problems: Vec<String>,
    /// Agents that exited, panicked or did not stop cleanly without the scenario killing them (must be none).
    pub crashed: Vec<String>,
    /// The scenario's own checks that failed (must be none).
    pub violations: Vec<String>,
    /// Times from a fault's end to the cluster being whole again (restart to ready, heal to converged, …).
    pub recoveries: Vec<Duration>,
    /// What else was measured, for the reader.
    pub notes: Vec<String>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Report {
    /// An empty report for `scenario` with `seed`.
    pub fn new(scenario: &str, seed: u64) -> Self {
        Self { scenario: scenario.to_owned(), seed, ..Self::default() }
    }

    /// Adds finished pulls: every one of them should have finished.
    pub fn pulls(&mut self, records: Vec<PullRecord>) {
        for r in records {
            self.pulls += 1;
            self.retried += usize::from(r.attempts > 1);
            for why in &r.retried_because {
                self.notes.push(format!("node {} retried {}: {why}", r.node, r.reference));
            }
            self.corrupt += usize::from(r.corrupt);
            if let Err(e) = r.outcome {
                self.failed.push(format!("node {} pulling {} ({} attempts): {e}", r.node, r.reference, r.attempts));
            }
        }
    }

    /// Records a check of the scenario's own: a violation unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.violations.push(what.into());
        }
    }

    /// Records a recovery time.
    pub fn recovered(&mut self, d: Duration) {
        self.recoveries.push(d);
    }

    /// Adds a note.
    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    /// Ok when every invariant held; else an error listing what did not.
    pub fn verdict(&self) -> Result<()> {
        let mut bad = Vec::new();
        bad.extend(self.failed.iter().map(|f| format!("pull failed: {f}")));
        if self.corrupt > 0 {
            bad.push(format!("{} corrupt blobs reached a client", self.corrupt));
        }
        bad.extend(self.store_problems.iter().map(|p| format!("store: {p}")));
        bad.extend(self.crashed.iter().map(|c| format!("agent: {c}")));
        bad.extend(self.violations.iter().cloned());
        if !bad.is_empty() {
            bail!("{} seed {}: {} invariant(s) broken:\n  {}", self.scenario, self.seed, bad.len(), bad.join("\n  "));
        }
        Ok(())
    }

    /// A few lines for the console.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} seed {}: {} pulls ({} retried), {} failed, {} corrupt, {} blobs stored, {} store problems, {} crashes, \
             {} violations, recovery {}, {:.1} s",
            self.scenario,
            self.seed,
            self.pulls,
            self.retried,
            self.failed.len(),
            self.corrupt,
            self.stored_blobs,
            self.store_problems.len(),
            self.crashed.len(),
            self.violations.len(),
            recovery(&self.recoveries),
            self.elapsed.as_secs_f64(),
        );
        for n in &self.notes {
            let _ = write!(s, "\n  {n}");
        }
        s
    }
}

fn recovery(d: &[Duration]) -> String {
    if d.is_empty() {
        return "–".into();
    }
    let mut v: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
    v.sort_by(f64::total_cmp);
    format!("p50 {:.2} s, max {:.2} s (n={})", v[v.len() / 2], v[v.len() - 1], v.len())
}

/// The Markdown table of many runs, one row per scenario.
pub fn table(reports: &[Report]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in reports {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    let mut s = String::from(
        "| scenario | runs | pulls | retried | failed | corrupt blobs | store problems | crashes | violations | recovery |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for name in names {
        let runs: Vec<&Report> = reports.iter().filter(|r| r.scenario == name).collect();
        let sum = |f: fn(&Report) -> usize| runs.iter().map(|r| f(r)).sum::<usize>();
        let recoveries: Vec<Duration> = runs.iter().flat_map(|r| r.recoveries.iter().copied()).collect();
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            runs.len(),
            sum(|r| r.pulls),
            sum(|r| r.retried),
            sum(|r| r.failed.len()),
            sum(|r| r.corrupt),
            sum(|r| r.store_problems.len()),
            sum(|r| r.crashed.len()),
            sum(|r| r.violations.len()),
            recovery(&recoveries),
        );
    }
    s
}
