//! The membership scenarios: real agent processes with no image traffic, many at once (`mass-join`: a whole
//! cluster launched together, then five killed at once; `half-restart`: half of it SIGKILLed and restarted at
//! once), checked through every agent's own member counts.

use std::time::{Duration, Instant};

use anyhow::Result;
use rand::seq::SliceRandom;
use shoal_testbed::{Agent, cluster::Cluster};

use super::{Run, Size};

impl Run<'_> {
    /// Waits until every one of `agents` shows `value` for metric `name` (with `labels`); how long it took, or
    /// `None` after `within`.
    async fn all_show(
        agents: &[&Agent],
        name: &str,
        labels: &[&str],
        value: f64,
        within: Duration,
    ) -> Option<Duration> {
        let start = Instant::now();
        let ok = shoal_testbed::wait_for(name, within, async || {
            for a in agents {
                if a.metric(name, labels).await.unwrap_or(-1.0) != value {
                    return false;
                }
            }
            true
        })
        .await;
        ok.ok().map(|()| start.elapsed())
    }

    /// Reports every agent that exited, but for the ones `killed` on purpose.
    fn exited(&mut self, agents: &mut [Agent], killed: &[usize]) {
        for (i, a) in agents.iter_mut().enumerate() {
            if !killed.contains(&i) && !a.running() {
                self.report.crashed.push(format!("agent {i} exited"));
            }
        }
    }

    /// Each agent whose view is not `alive` alive and none suspect: its counts (for a failure's message).
    async fn views(agents: &[&Agent], alive: f64) -> String {
        let mut off = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            let state = |s: &'static str| async move {
                a.metric("shoal_peers", &[&format!("state=\"{s}\"")]).await.unwrap_or(-1.0)
            };
            let (al, su, de) = (state("alive").await, state("suspect").await, state("dead").await);
            let health = a.metric("shoal_membership_local_health", &[]).await.unwrap_or(-1.0);
            if al != alive || su != 0.0 {
                off.push(format!("agent {i}: {al} alive, {su} suspect, {de} dead, local health {health}"));
            }
        }
        if off.is_empty() { "every view is right now".to_owned() } else { off.join("; ") }
    }

    /// Waits until each of `agents` sees `alive` members alive and none suspect; how long it took, or `None`.
    async fn all_see(agents: &[&Agent], alive: f64, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        Self::all_show(agents, "shoal_peers", &["state=\"alive\""], alive, within).await?;
        let left = within.saturating_sub(start.elapsed());
        Self::all_show(agents, "shoal_peers", &["state=\"suspect\""], 0.0, left).await?;
        Some(start.elapsed())
    }

    pub(super) async fn mass_join(&mut self) -> Result<()> {
        // The short run is CI's: debug agents (2.4× a release agent's idle CPU), so 50 of them on two cores. The
        // long run is the issue's: 100 agents all seeing each other within 10 s (run it with a release `SHOAL_BIN`).
        let n = match self.size {
            Size::Short => 50,
            Size::Long => 100,
        };
        let cl = Cluster::start().await?;
        let port = shoal_testbed::free_port()?;
        // Hosts 127.0.0.20 and up; the order they are launched in is the seed's.
        let mut hosts: Vec<u8> = (0..n).map(|i| 20 + i as u8).collect();
        hosts.shuffle(&mut self.rng);
        let launched = Instant::now();
        let mut agents = cl.start_at_once(&hosts, port, |b| b).await?;
        let up = launched.elapsed();
        let all: Vec<&Agent> = agents.iter().collect();
        let (within, deaths_within) = match self.size {
            Size::Short => (Duration::from_secs(20), Duration::from_secs(20)),
            Size::Long => (Duration::from_secs(10), Duration::from_secs(15)),
        };
        let joined = Self::all_see(&all, (n - 1) as f64, within).await;
        if joined.is_none() {
            let views = Self::views(&all, (n - 1) as f64).await;
            self.report.check(false, format!("{n} agents did not all see each other alive within {within:?}: {views}"));
        }
        if let Some(d) = joined {
            self.report.recovered(d);
        }
        // Five die at once: every other sees them dead within a probe cycle, the suspicion time and the spread.
        let mut victims: Vec<usize> = (0..n).collect();
        victims.shuffle(&mut self.rng);
        victims.truncate(5);
        for &v in &victims {
            agents[v].kill().await;
        }
        let rest: Vec<&Agent> =
            agents.iter().enumerate().filter(|(i, _)| !victims.contains(i)).map(|(_, a)| a).collect();
        let dead_seen = Self::all_show(&rest, "shoal_peers", &["state=\"dead\""], 5.0, deaths_within).await;
        self.report.check(
            dead_seen.is_some(),
            format!("5 agents killed at once were not seen dead by every other within {deaths_within:?}"),
        );
        if let Some(d) = dead_seen {
            self.report.recovered(d);
        }
        self.exited(&mut agents, &victims);
        self.report.note(format!(
            "{n} agents launched at once in {up:.1?} (each up = listening and its first join done); recoveries: \
             all-see-all after the last was up, then the 5 deaths seen by all"
        ));
        Ok(())
    }

    pub(super) async fn half_restart(&mut self) -> Result<()> {
        let n = match self.size {
            Size::Short => 20,
            Size::Long => 60,
        };
        let cl = Cluster::start().await?;
        let port = shoal_testbed::free_port()?;
        let hosts: Vec<u8> = (0..n).map(|i| 20 + i as u8).collect();
        let mut agents = cl.start_at_once(&hosts, port, |b| b).await?;
        let within = Duration::from_secs(20);
        {
            let all: Vec<&Agent> = agents.iter().collect();
            let joined = Self::all_see(&all, (n - 1) as f64, within).await;
            if joined.is_none() {
                let views = Self::views(&all, (n - 1) as f64).await;
                self.report.check(false, format!("{n} agents did not see each other within {within:?}: {views}"));
            }
        }
        let mut half: Vec<usize> = (0..n).collect();
        half.shuffle(&mut self.rng);
        half.truncate(n / 2);
        for &i in &half {
            agents[i].kill().await;
        }
        // Down for a little while (longer than the suspicion time for some, shorter for others: it is random).
        self.pause(2000..7000).await;
        let restarted = Instant::now();
        let restarts = agents.iter_mut().enumerate().filter(|(i, _)| half.contains(i)).map(|(_, a)| a.restart());
        for r in futures_util::future::join_all(restarts).await {
            r?;
        }
        let up = restarted.elapsed();
        let all: Vec<&Agent> = agents.iter().collect();
        let back = Self::all_see(&all, (n - 1) as f64, within).await;
        if back.is_none() {
            let views = Self::views(&all, (n - 1) as f64).await;
            self.report.check(
                false,
                format!("after half the cluster restarted at once, not every agent saw the {} others: {views}", n - 1),
            );
        }
        if let Some(d) = back {
            self.report.recovered(up + d);
        }
        self.exited(&mut agents, &[]);
        self.report.note(format!(
            "{} of {n} agents SIGKILLed at once, restarted at once (up again after {up:.1?}); recovery = from the \
             restart until every agent sees every other alive",
            n / 2
        ));
        Ok(())
    }
}
