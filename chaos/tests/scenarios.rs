//! The short run of every chaos scenario, with a fixed seed (CI): each must keep every invariant. The long runs:
//! `shoal-chaos soak --minutes N`.

use shoal_chaos::{Scenario, Size};

const SEED: u64 = 20261122;

async fn short(s: Scenario) {
    let report = s.run(SEED, Size::Short).await.unwrap_or_else(|e| panic!("{} could not run: {e:#}", s.name()));
    println!("{}", report.summary());
    if let Err(e) = report.verdict() {
        panic!("{e:#}\nreplay: shoal-chaos run {} --seed {SEED}", s.name());
    }
}

#[tokio::test]
async fn peer_kill() {
    short(Scenario::PeerKill).await;
}

#[tokio::test]
async fn partition() {
    short(Scenario::Partition).await;
}

#[tokio::test]
async fn byzantine_peer() {
    short(Scenario::ByzantinePeer).await;
}

#[tokio::test]
async fn upstream_outage() {
    short(Scenario::UpstreamOutage).await;
}

#[tokio::test]
async fn slow_peer() {
    short(Scenario::SlowPeer).await;
}

#[tokio::test]
async fn crash_restart() {
    short(Scenario::CrashRestart).await;
}

#[tokio::test]
async fn disk_full() {
    short(Scenario::DiskFull).await;
}

#[tokio::test]
async fn agent_down() {
    short(Scenario::AgentDown).await;
}

#[tokio::test]
async fn churn() {
    short(Scenario::Churn).await;
}

#[tokio::test]
async fn byzantine_tag() {
    short(Scenario::ByzantineTag).await;
}

#[tokio::test]
async fn hostile_pod() {
    short(Scenario::HostilePod).await;
}

#[tokio::test]
async fn mass_join() {
    short(Scenario::MassJoin).await;
}

#[tokio::test]
async fn half_restart() {
    short(Scenario::HalfRestart).await;
}
