//! Burst mode end to end: several real agents (127.0.0.x, real gossip and QUIC) pull the same image at the same
//! moment through a real `docker-registry` behind the counting proxy, some with a real containerd, the others with
//! the testbed's HTTP client that pulls as containerd does. What is asserted is behaviour (who asked upstream for
//! what, how many bytes crossed a zone), never speed.

use std::time::Duration;

use anyhow::Result;
use futures_util::future::join_all;
use shoal_testbed::client::{self, Endpoint, Pulled};
use shoal_testbed::cluster::{Cluster, wait_alive};
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, AgentBuilder, Containerd, Fault, wait_for};

const REPO: &str = "burst/app";

/// `n` agents on 127.0.0.<first>…, all bootstrapping from the first, each configured by `with` (its index), all
/// seeing each other alive.
async fn cluster_of(
    cl: &Cluster,
    first: u8,
    n: u8,
    with: impl Fn(u8, AgentBuilder) -> AgentBuilder,
) -> Result<Vec<Agent>> {
    let mut agents: Vec<Agent> = Vec::new();
    for i in 0..n {
        let boot: Vec<&Agent> = agents.first().into_iter().collect();
        agents.push(with(i, cl.agent(first + i, &boot)).start().await?);
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_alive(&refs, f64::from(n - 1), Duration::from_secs(30)).await?;
    Ok(agents)
}

fn endpoint(cl: &Cluster, a: &Agent) -> Endpoint {
    Endpoint { base: a.url(), ns: Some(cl.proxy.host()) }
}

async fn push_image(cl: &Cluster, layers: &[usize], seed: u64) -> Result<Artifact> {
    let image = Artifact::Image(Image::random(layers, seed, "amd64", Compression::None)?);
    push(&image, &cl.registry.host(), REPO, "v1", None, Format::Oci)?;
    Ok(image)
}

/// Every manifest and blob of the image went out of upstream exactly once, and the tag was asked by a HEAD once
/// per node (each node takes a tag from upstream only, never from a member: a HEAD carries no body).
fn assert_upstream_once(cl: &Cluster, image: &Artifact, nodes: usize) {
    for blob in std::iter::once(image.top()).chain(image.all_blobs()) {
        assert_eq!(cl.proxy.count("GET", &format!("/{}", blob.digest)), 1, "upstream GETs of {}", blob.digest);
    }
    assert_eq!(cl.proxy.count("HEAD", "/manifests/v1"), nodes, "upstream HEADs of the tag: {:?}", cl.proxy.counts());
    assert_eq!(cl.proxy.count("GET", "/manifests/v1"), 0);
}

fn assert_pulled_everything(image: &Artifact, pulled: &Pulled) {
    for blob in std::iter::once(image.top()).chain(image.all_blobs()) {
        assert!(pulled.digests.contains(&blob.digest), "{} not pulled", blob.digest);
    }
}

async fn sum(agents: &[Agent], metric: &str) -> f64 {
    let mut total = 0.0;
    for a in agents {
        total += a.metric(metric, &[]).await.unwrap_or(0.0);
    }
    total
}

#[tokio::test]
async fn a_burst_of_six_sends_every_blob_and_manifest_upstream_once() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = push_image(&cl, &[6 << 20, 3 << 20, 1 << 20], 41).await?;
    let agents = cluster_of(&cl, 81, 6, |_, b| b).await?;
    let reference = format!("{}/{REPO}:v1", cl.proxy.host());
    let mut ctrs = Vec::new();
    for a in &agents[..2] {
        let c = Containerd::start().await?;
        c.configure_host(&cl.proxy.host(), Some(&a.url()))?;
        ctrs.push(c);
    }
    let http = reqwest::Client::new();
    let eps: Vec<Endpoint> = agents[2..].iter().map(|a| endpoint(&cl, a)).collect();
    // Everyone at the same moment: two containerd pulls and four HTTP pulls.
    let (ctr_out, http_out) = tokio::join!(
        join_all(ctrs.iter().map(|c| c.pull(&reference, None, &[]))),
        join_all(eps.iter().map(|ep| client::pull(&http, ep, REPO, "v1"))),
    );
    for (i, out) in ctr_out.into_iter().enumerate() {
        let out = out?;
        assert!(out.success, "containerd pull on agent {i} failed: {}\n{}", out.output, agents[i].log());
    }
    for c in &ctrs {
        for blob in std::iter::once(image.top()).chain(image.all_blobs()) {
            assert!(c.has_verified(&blob.digest).await?, "containerd lacks a verified {}", blob.digest);
        }
    }
    for (i, pulled) in http_out.into_iter().enumerate() {
        let pulled = pulled.map_err(|e| anyhow::anyhow!("pull on agent {}: {e:#}\n{}", i + 2, agents[i + 2].log()))?;
        assert_pulled_everything(&image, &pulled);
    }
    assert_upstream_once(&cl, &image, agents.len());
    // The nodes fed each other: together they received at least five times the image from peers.
    let size: usize = std::iter::once(image.top()).chain(image.all_blobs()).map(|b| b.data.len()).sum();
    let received = sum(&agents, "shoal_peer_received_bytes_total").await;
    assert!(received >= 5.0 * size as f64, "peers delivered {received} bytes for 6 pulls of {size}");
    Ok(())
}

#[tokio::test]
async fn with_two_zones_every_blob_crosses_the_zone_boundary_once() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = push_image(&cl, &[4 << 20, 2 << 20, 1 << 20], 42).await?;
    let zone = |i: u8, b: AgentBuilder| b.setting("zone", if i < 3 { "\"zone-a\"" } else { "\"zone-b\"" });
    let agents = cluster_of(&cl, 91, 6, zone).await?;
    let http = reqwest::Client::new();
    let eps: Vec<Endpoint> = agents.iter().map(|a| endpoint(&cl, a)).collect();
    let pulls = join_all(eps.iter().map(|ep| client::pull(&http, ep, REPO, "v1"))).await;
    for (i, pulled) in pulls.into_iter().enumerate() {
        let pulled = pulled.map_err(|e| anyhow::anyhow!("pull on agent {i}: {e:#}\n{}", agents[i].log()))?;
        assert_pulled_everything(&image, &pulled);
    }
    assert_upstream_once(&cl, &image, agents.len());
    // Manifest, config and layers each crossed into the zone that did not fetch them, once.
    let size: usize = std::iter::once(image.top()).chain(image.all_blobs()).map(|b| b.data.len()).sum();
    assert_eq!(sum(&agents, "shoal_peer_received_cross_zone_bytes_total").await, size as f64);
    Ok(())
}

#[tokio::test]
async fn killing_the_home_mid_burst_still_completes_every_other_node() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = push_image(&cl, &[48 << 20], 43).await?;
    let mut agents = cluster_of(&cl, 101, 5, |_, b| b).await?;
    // Upstream slow enough that the burst is surely running when the home dies.
    cl.proxy.set_fault(Fault::Throttle(12 << 20));
    let http = reqwest::Client::new();
    let eps: Vec<Endpoint> = agents.iter().map(|a| endpoint(&cl, a)).collect();
    let pulls: Vec<_> = eps
        .iter()
        .map(|ep| {
            let (http, ep) = (http.clone(), ep.clone());
            tokio::spawn(async move { client::pull(&http, &ep, REPO, "v1").await })
        })
        .collect();
    // The layer's home is the one node fetching it from upstream: kill it once 8 MiB of it arrived.
    let mut home = None;
    wait_for("the home to be fetching the layer", Duration::from_secs(30), async || {
        for (i, a) in agents.iter().enumerate() {
            if a.metric("shoal_upstream_bytes_total", &[]).await.unwrap_or(0.0) > f64::from(8 << 20) {
                home = Some(i);
                return true;
            }
        }
        false
    })
    .await?;
    let home = home.expect("found");
    agents[home].kill().await;
    for (i, p) in pulls.into_iter().enumerate() {
        let r = p.await?;
        if i == home {
            continue;
        }
        let pulled = r.map_err(|e| anyhow::anyhow!("pull on agent {i}: {e:#}\n{}", agents[i].log()))?;
        assert_pulled_everything(&image, &pulled);
    }
    // A new home took over from the pieces the survivors had: not every survivor went upstream on its own.
    let layer = &image.all_blobs()[1].digest;
    let gets = cl.proxy.count("GET", &format!("/blobs/{layer}"));
    assert!(gets <= 2, "upstream GETs of the layer: {gets}");
    Ok(())
}

#[tokio::test]
async fn a_burst_across_network_namespaces_with_a_capped_upstream_fetches_once() -> Result<()> {
    use shoal_testbed::netns::{Bridge, Netns, Rate};
    use shoal_testbed::{NsProxy, Registry};
    // Three nodes, each in its own namespace on a bridge; the upstream in another, its link capped.
    let bridge = Bridge::create("sht")?;
    let up = bridge.netns(1, Some(Rate::mbit(200)))?;
    let nodes: Vec<Netns> = (11..14).map(|n| bridge.netns(n, Some(Rate::mbit(1000)))).collect::<Result<_>>()?;
    let registry = Registry::start_in(&up, 5001, None).await?;
    let upstream = format!("{}:5000", up.ip());
    let proxy = NsProxy::start(&up, upstream.parse()?, registry.addr()).await?;
    let stats = proxy.stats().clone();
    let image = Artifact::Image(Image::random(&[3 << 20, 1 << 20], 44, "amd64", Compression::None)?);
    push(&image, &registry.host(), REPO, "v1", None, Format::Oci)?;
    stats.reset();

    let dir = tempfile::Builder::new().prefix("shoal-netns").tempdir()?;
    let secret = shoal_testbed::cluster::write_secret(&dir, "secret", "a cluster secret of enough bytes")?;
    let mut agents: Vec<Agent> = Vec::new();
    for ns in &nodes {
        let boot: Vec<_> = agents.first().and_then(|a| a.gossip_addr).into_iter().collect();
        agents.push(Agent::builder().registry(&upstream).mesh(&secret, ns.ip(), &boot).netns(ns).start().await?);
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_alive(&refs, 2.0, Duration::from_secs(30)).await?;
    // Each node's client runs inside its namespace, against the agent on that namespace's loopback.
    let pulls: Vec<_> = nodes
        .iter()
        .zip(&agents)
        .map(|(ns, a)| {
            let ep = Endpoint { base: a.url(), ns: Some(upstream.clone()) };
            ns.spawn(move || async move {
                let http = reqwest::Client::builder().no_proxy().build()?;
                client::pull(&http, &ep, REPO, "v1").await
            })
        })
        .collect();
    for (i, p) in pulls.into_iter().enumerate() {
        let pulled = p.await?.map_err(|e| anyhow::anyhow!("pull on node {i}: {e:#}\n{}", agents[i].log()))?;
        assert_pulled_everything(&image, &pulled);
    }
    let size: usize = std::iter::once(image.top()).chain(image.all_blobs()).map(|b| b.data.len()).sum();
    assert_eq!(stats.body_bytes(), size as u64, "upstream sent each byte of the image once");
    // The upstream namespace's link carried the image once (plus headers), not three times.
    assert!(up.sent_bytes()? < 2 * size as u64);
    drop(proxy);
    Ok(())
}

#[tokio::test]
async fn a_stalled_upstream_in_a_burst_ends_every_client_in_an_error_not_a_hang() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = push_image(&cl, &[2 << 20], 45).await?;
    let layer = image.all_blobs()[1].digest.clone();
    let agents = cluster_of(&cl, 111, 3, |_, b| b.setting("upstream_stall_timeout", "\"500ms\"")).await?;
    // Headers come at once, then the body never moves.
    cl.proxy.set_fault(Fault::Throttle(1));
    let started = std::time::Instant::now();
    let http = reqwest::Client::new();
    let gets = agents.iter().map(|a| {
        let (http, url) = (http.clone(), cl.blob_url(a, REPO, &layer));
        async move {
            match http.get(url).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.map(|b| b.len()).map_err(|e| e.to_string()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    });
    let outcomes = tokio::time::timeout(Duration::from_secs(90), join_all(gets)).await;
    let outcomes = outcomes.expect("a client hung on a stalled upstream in a burst");
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.is_err(), "agent {i} delivered a whole body from a stalled upstream: {o:?}");
    }
    eprintln!(
        "every client got its error after {:?}; upstream GETs of the layer: {}",
        started.elapsed(),
        cl.proxy.count("GET", &format!("/blobs/{layer}"))
    );
    Ok(())
}

/// Five agents configured with `swarm` and `max_uploads` pull a one-layer image at once, each agent's uploads
/// capped (so the home alone cannot feed everyone at once): every pull completes, the layer leaves upstream once,
/// and the answer is what the burst did with the layer.
async fn layer_flows(swarm: &str, first: u8, max_uploads: u32) -> Result<Flows> {
    let cl = Cluster::start().await?;
    let image = push_image(&cl, &[16 << 20], 46).await?;
    let with = |_, b: AgentBuilder| {
        b.setting("swarm", &format!("\"{swarm}\""))
            .setting("upload_rate", "\"6MiB\"")
            .setting("max_uploads", &max_uploads.to_string())
    };
    let agents = cluster_of(&cl, first, 5, with).await?;
    let http = reqwest::Client::new();
    let eps: Vec<Endpoint> = agents.iter().map(|a| endpoint(&cl, a)).collect();
    let pulled = join_all(eps.iter().map(|ep| client::pull(&http, ep, REPO, "v1"))).await;
    for (i, p) in pulled.into_iter().enumerate() {
        let p = p.map_err(|e| anyhow::anyhow!("pull on agent {i}: {e:#}\n{}", agents[i].log()))?;
        assert_pulled_everything(&image, &p);
    }
    assert_upstream_once(&cl, &image, agents.len());
    let layer = image.all_blobs()[1].digest.clone();
    let reference = format!("{}/{REPO}:v1", cl.proxy.host());
    let (mut flows, mut failed_sources) = (Vec::new(), 0);
    for a in &agents {
        let me = a.peer_id().expect("agents log their peer id");
        let x = a.cli_json(&["explain", &reference]).await?;
        let blob = x["blobs"].as_array().into_iter().flatten().find(|b| b["digest"] == layer.as_str());
        failed_sources += blob.and_then(|b| b["source_failures"].as_u64()).unwrap_or(0);
        for p in blob.and_then(|b| b["from_peers"].as_array()).into_iter().flatten() {
            let from = p["peer_id"].as_str().expect("a peer id").to_owned();
            if p["bytes"].as_u64().unwrap_or(0) > 0 {
                flows.push((me.clone(), from));
            }
        }
    }
    println!("{swarm}: layer bytes flowed (receiver, sender): {flows:?}; failed sources {failed_sources}");
    Ok(Flows { pairs: flows, refused: sum(&agents, "shoal_peer_uploads_refused_total").await, failed_sources })
}

/// What a burst did with its layer.
struct Flows {
    /// (receiver, sender) peer ids of the layer's bytes (from `shoal explain`).
    pairs: Vec<(String, String)>,
    /// Piece requests the agents refused for want of an upload slot.
    refused: f64,
    /// Sources the downloads of the layer counted as failed (`shoal explain`).
    failed_sources: u64,
}

/// Pairs of agents that each sent the other bytes of the layer.
fn both_ways(flows: &[(String, String)]) -> usize {
    flows.iter().filter(|(to, from)| flows.contains(&(from.clone(), to.clone()))).count() / 2
}

#[tokio::test]
async fn traders_in_a_burst_send_each_other_pieces_of_the_same_blob() -> Result<()> {
    // Out of order, a node that arrived early takes pieces from one that arrived later, and gives it others.
    let flows = layer_flows("exchange", 111, 128).await?.pairs;
    assert!(both_ways(&flows) > 0, "no two agents traded pieces both ways: {flows:?}");
    Ok(())
}

#[tokio::test]
async fn in_a_tree_pieces_of_a_blob_flow_one_way_between_any_two_agents() -> Result<()> {
    // In order, a node takes pieces only from nodes ahead of it: what the exchange test sees cannot happen here.
    // Enough upload slots that no request is refused as BUSY (in a tree that ends a source's part).
    let Flows { pairs: flows, refused, .. } = layer_flows("tree", 121, 128).await?;
    assert_eq!(refused, 0.0);
    assert!(flows.len() >= 4, "the burst fed itself: {flows:?}");
    assert_eq!(both_ways(&flows), 0, "{flows:?}");
    Ok(())
}

#[tokio::test]
async fn traders_refused_for_want_of_an_upload_slot_ask_again_and_the_blob_leaves_upstream_once() -> Result<()> {
    // One upload slot per agent: holders refuse most requests as BUSY; the exchange rests them and asks again.
    let f = layer_flows("exchange", 131, 1).await?;
    assert!(f.refused > 0.0, "no request was refused: the test shows nothing");
    assert_eq!(f.failed_sources, 0, "a busy holder was taken for a failed one");
    assert!(f.pairs.len() >= 4, "the burst fed itself: {:?}", f.pairs);
    Ok(())
}
