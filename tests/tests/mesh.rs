//! End to end across nodes: several real `shoal agent` processes (each on its own 127.0.0.x address) form a mesh
//! over real gossip (TCP) and real QUIC, in front of a real `docker-registry` behind the counting proxy.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use shoal_testbed::cluster::{Cluster, alive, wait_alive, wait_directory, write_secret};
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, AgentBuilder, Containerd, Registry, sha256_digest, wait_for};

async fn get(url: &str) -> Result<(u16, Vec<u8>)> {
    let resp = reqwest::get(url).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default()))
}

#[tokio::test]
async fn a_node_pulls_every_layer_from_a_peer_when_upstream_is_gone() -> Result<()> {
    let mut cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[3 << 20, 1 << 20, 200_000], 11, "amd64", Compression::Gzip)?);
    let digest = push(&image, &cl.registry.host(), "team/app", "v1", None, Format::Oci)?;
    // A alone pulls the image (B, started later, is not the home that fetched any of it).
    let a = cl.agent(21, &[]).start().await?;
    let ca = Containerd::start().await?;
    ca.configure_host(&cl.proxy.host(), Some(&a.url()))?;
    let out = ca.pull(&format!("{}/team/app:v1", cl.proxy.host()), None, &[]).await?;
    assert!(out.success, "pull on A failed: {}\n{}", out.output, a.log());
    let blobs = image.all_blobs();
    let b = cl.agent(22, &[&a]).start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_directory(&[&a, &b], blobs.len() as f64).await?;

    cl.stop_upstream().await;
    let cb = Containerd::start().await?;
    cb.configure_host(&cl.proxy.host(), Some(&b.url()))?;
    let out = cb.pull(&format!("{}/team/app@{digest}", cl.proxy.host()), None, &[]).await?;
    assert!(out.success, "pull on B failed: {}\nB:\n{}\nA:\n{}", out.output, b.log(), a.log());
    for blob in &blobs {
        assert!(cb.has_verified(&blob.digest).await?, "B's containerd lacks a verified {}", blob.digest);
    }
    // Every byte B's containerd got came from A over QUIC; none from upstream.
    let total: usize = blobs.iter().map(|b| b.data.len()).sum();
    let received = b.metric("shoal_peer_received_bytes_total", &[]).await?;
    assert!(received >= total as f64, "B received {received} bytes from peers, the image has {total}");
    assert!(a.metric("shoal_peer_sent_bytes_total", &[]).await? >= total as f64);
    assert_eq!(b.metric("shoal_upstream_bytes_total", &[]).await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn five_agents_see_each_other_mark_the_dead_and_take_back_the_restarted() -> Result<()> {
    let cl = Cluster::start().await?;
    let first = cl.agent(31, &[]).start().await?;
    let mut agents = vec![first];
    for n in 32..36 {
        let a = cl.agent(n, &[&agents[0]]).start().await?;
        agents.push(a);
    }
    let all: Vec<&Agent> = agents.iter().collect();
    wait_alive(&all, 4.0, Duration::from_secs(20)).await?;

    agents[2].kill().await;
    let rest: Vec<&Agent> = agents.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, a)| a).collect();
    // dead_after is 2s in the testbed: well within this.
    wait_for("the others to mark the killed agent dead", Duration::from_secs(10), async || {
        for a in &rest {
            if alive(a).await != 3.0 || a.metric("shoal_peers", &["state=\"dead\""]).await.unwrap_or(0.0) != 1.0 {
                return false;
            }
        }
        true
    })
    .await?;

    agents[2].restart().await?;
    let all: Vec<&Agent> = agents.iter().collect();
    wait_alive(&all, 4.0, Duration::from_secs(20)).await?;
    Ok(())
}

#[tokio::test]
async fn an_agent_without_the_secret_gets_no_membership_and_no_bytes() -> Result<()> {
    let mut cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[2 << 20], 12, "amd64", Compression::None)?);
    push(&image, &cl.registry.host(), "secret/app", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    let a = cl.agent(41, &[]).start().await?;
    let b = cl.agent(42, &[&a]).start().await?;
    let wrong = write_secret(&cl.dir, "wrong", "not the cluster's secret at all")?;
    let bootstrap = [a.gossip_addr.expect("in a mesh")];
    let intruder = Agent::builder()
        .registry(&cl.proxy.host())
        .mesh(&wrong, Ipv4Addr::new(127, 0, 0, 43), &bootstrap)
        .start()
        .await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;

    let (status, body) = get(&cl.blob_url(&a, "secret/app", &layer.digest)).await?;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), layer.digest);
    wait_directory(&[&a, &b], 1.0).await?;
    // The intruder dials A at start and again at each redial round: once A has turned it away twice, it has had
    // its chances; it is still alone and nobody counts it.
    wait_for("A to refuse the intruder twice", Duration::from_secs(15), async || {
        a.metric("shoal_gossip_refused_connections_total", &[]).await.unwrap_or(0.0) >= 2.0
    })
    .await?;
    assert_eq!(alive(&a).await, 1.0);
    assert_eq!(alive(&b).await, 1.0);
    for state in ["alive", "suspect", "dead"] {
        assert_eq!(intruder.metric("shoal_peers", &[&format!("state=\"{state}\"")]).await?, 0.0);
    }
    cl.stop_upstream().await;
    let (status, _) = get(&cl.blob_url(&intruder, "secret/app", &layer.digest)).await?;
    assert_ne!(status, 200, "the intruder got the blob");
    assert_eq!(intruder.metric("shoal_peer_received_bytes_total", &[]).await?, 0.0);
    assert_eq!(a.metric("shoal_peer_sent_bytes_total", &[]).await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn a_peer_killed_mid_transfer_is_replaced_by_another_holder() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[256 << 20], 13, "amd64", Compression::None)?);
    push(&image, &cl.registry.host(), "big/layer", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    // Uploads capped so the transfer is surely running when the serving peer dies.
    let capped = |b: AgentBuilder| b.setting("upload_rate", "\"48MiB\"");
    let url = |agent: &Agent| cl.blob_url(agent, "big/layer", &layer.digest);

    // A alone from upstream, then B (joining) from A: two complete holders, one upstream fetch. C joins last, so
    // it holds nothing whichever member is the layer's home.
    let mut a = capped(cl.agent(51, &[])).start().await?;
    let (status, body) = get(&url(&a)).await?;
    assert_eq!((status, sha256_digest(&body)), (200, layer.digest.clone()));
    drop(body);
    let mut b = capped(cl.agent(52, &[&a])).start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_directory(&[&a, &b], 1.0).await?;
    let (status, body) = get(&url(&b)).await?;
    assert_eq!((status, sha256_digest(&body)), (200, layer.digest.clone()));
    drop(body);
    let c = cl.agent(53, &[&a]).start().await?;
    wait_alive(&[&a, &b, &c], 2.0, Duration::from_secs(15)).await?;
    // The layer's home (whichever member it is now) knows both holders, and only it does.
    wait_for("the home to know both holders", Duration::from_secs(10), async || {
        let (mut holders, mut digests) = (0.0, 0.0);
        for agent in [&a, &b, &c] {
            holders += agent.metric("shoal_directory_holders", &[]).await.unwrap_or(0.0);
            digests += agent.metric("shoal_directory_digests", &[]).await.unwrap_or(0.0);
        }
        holders == 2.0 && digests == 1.0
    })
    .await?;

    let sent_before =
        [a.metric("shoal_peer_sent_bytes_total", &[]).await?, b.metric("shoal_peer_sent_bytes_total", &[]).await?];
    let resp = reqwest::get(url(&c)).await?;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut hasher_input = Vec::with_capacity(layer.data.len());
    while hasher_input.len() < 32 << 20 {
        hasher_input.extend_from_slice(&stream.next().await.expect("body continues")?);
    }
    // Kill whichever holder is serving C now.
    let sent_a = a.metric("shoal_peer_sent_bytes_total", &[]).await? - sent_before[0];
    let sent_b = b.metric("shoal_peer_sent_bytes_total", &[]).await? - sent_before[1];
    assert!(sent_a + sent_b > 0.0, "C is not being served by a peer");
    if sent_a >= sent_b {
        a.kill().await
    } else {
        b.kill().await
    }
    while let Some(chunk) = stream.next().await {
        hasher_input.extend_from_slice(&chunk?);
    }
    assert_eq!(sha256_digest(&hasher_input), layer.digest, "C's body is not the layer");
    // The rest came from the surviving holder, not from upstream.
    assert_eq!(cl.proxy.count("GET", &format!("/blobs/{}", layer.digest)), 1);
    assert_eq!(c.metric("shoal_upstream_bytes_total", &[]).await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn a_peer_serving_corrupt_pieces_is_quarantined_and_the_pull_completes() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[8 << 20], 14, "amd64", Compression::None)?);
    push(&image, &cl.registry.host(), "rot/app", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    // A alone fetches it; B joins after, so A's copy is the only one whichever member is the home.
    let a = cl.agent(61, &[]).start().await?;
    let (status, _) = get(&cl.blob_url(&a, "rot/app", &layer.digest)).await?;
    assert_eq!(status, 200);
    let b = cl.agent(62, &[&a]).start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_directory(&[&a, &b], 1.0).await?;

    // Bit rot on A's disk, after A verified and hashed the blob.
    let hex = layer.digest.trim_start_matches("sha256:");
    let path = a.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&path)?;
    bytes[5 << 20] ^= 0x40;
    std::fs::write(&path, bytes)?;

    let (status, body) = get(&cl.blob_url(&b, "rot/app", &layer.digest)).await?;
    assert_eq!(status, 200, "{}", b.log());
    assert_eq!(sha256_digest(&body), layer.digest);
    assert!(b.metric("shoal_peer_transfer_failures_total", &["reason=\"hash_mismatch\""]).await? >= 1.0);
    assert_eq!(b.metric("shoal_peers_quarantined", &[]).await?, 1.0);
    // The pieces A delivered before its rotten one were kept; the rest came from upstream, and nothing twice.
    let from_peers = b.metric("shoal_peer_received_bytes_total", &[]).await?;
    let from_upstream = b.metric("shoal_upstream_bytes_total", &[]).await?;
    assert!(from_upstream > 0.0, "upstream sent nothing");
    assert_eq!(from_peers + from_upstream, layer.data.len() as f64, "from A {from_peers}, upstream {from_upstream}");
    Ok(())
}

#[tokio::test]
async fn a_private_layer_held_by_a_peer_goes_only_to_clients_upstream_accepts() -> Result<()> {
    let mut cl = Cluster::with(Registry::start_private("alice", "wonderland").await?).await?;
    let image = Artifact::Image(Image::random(&[1 << 20], 15, "amd64", Compression::None)?);
    push(&image, &cl.registry.host(), "private/app", "v1", cl.registry.creds_arg().as_deref(), Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    let a = cl.agent(71, &[]).start().await?;
    let http = reqwest::Client::new();
    let url_a = cl.blob_url(&a, "private/app", &layer.digest);

    // A (alone) fetches it with alice's credentials: a private holding. B joins after.
    let body = http.get(&url_a).basic_auth("alice", Some("wonderland")).send().await?.bytes().await?;
    assert_eq!(sha256_digest(&body), layer.digest);
    let b = cl.agent(72, &[&a]).start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_directory(&[&a, &b], 1.0).await?;
    let url_b = cl.blob_url(&b, "private/app", &layer.digest);

    // On B, a client without credentials gets upstream's challenge, a wrong password is refused: no peer bytes.
    assert_eq!(http.get(&url_b).send().await?.status(), 401);
    assert_eq!(http.get(&url_b).basic_auth("alice", Some("guess")).send().await?.status(), 401);
    assert_eq!(b.metric("shoal_peer_received_bytes_total", &[]).await?, 0.0);

    // Alice, accepted by upstream, gets A's copy over the mesh, not a second upstream download.
    let upstream_gets = cl.proxy.count("GET", &format!("/blobs/{}", layer.digest));
    let body = http.get(&url_b).basic_auth("alice", Some("wonderland")).send().await?.bytes().await?;
    assert_eq!(sha256_digest(&body), layer.digest);
    assert!(b.metric("shoal_peer_received_bytes_total", &[]).await? >= layer.data.len() as f64);
    assert_eq!(cl.proxy.count("GET", &format!("/blobs/{}", layer.digest)), upstream_gets);

    // With upstream gone, nobody on a third node gets the private copy: it cannot be checked.
    let c = cl.agent(73, &[&a]).start().await?;
    wait_alive(&[&a, &b, &c], 2.0, Duration::from_secs(15)).await?;
    cl.stop_upstream().await;
    let url_c = cl.blob_url(&c, "private/app", &layer.digest);
    assert_ne!(http.get(&url_c).send().await?.status(), 200);
    assert_ne!(http.get(&url_c).basic_auth("alice", Some("wonderland")).send().await?.status(), 200);
    assert_eq!(c.metric("shoal_peer_received_bytes_total", &[]).await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn members_are_their_nodes_and_unbound_identities_are_refused() -> Result<()> {
    use shoal_testbed::kube::{FakeApi, FakeNode};
    let ip = |n: u8| Ipv4Addr::new(127, 0, 0, n);
    let api = FakeApi::start(vec![
        FakeNode::new("node-1", ip(91), Some("z1")),
        FakeNode::new("node-2", ip(92), Some("z1")),
        FakeNode::new("node-3", ip(93), Some("z1")),
    ])
    .await?;
    let cl = Cluster::start().await?;
    let on = |n: u8, node: &str, peers: &[&Agent]| -> Result<AgentBuilder> {
        Ok(cl.agent(n, peers).setting("node_name", &format!("\"{node}\"")).env("KUBECONFIG", api.kubeconfig_env()?))
    };
    let a = on(91, "node-1", &[])?.start().await?;
    let b = on(92, "node-2", &[&a])?.start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    // A member claiming another node's name from its own address, and one naming a node that does not exist.
    let impostor = on(93, "node-2", &[&a])?.start().await?;
    let invented = on(94, "node-9", &[&a])?.start().await?;
    // Up to 30 s: a loaded machine once took longer than 15 s to get the impostor's first message through (its
    // dials failed in the transport handshake meanwhile; it redials every 3 s).
    wait_for("A to refuse both", Duration::from_secs(30), async || {
        a.metric("shoal_membership_refused_messages_total", &[]).await.unwrap_or(0.0) >= 2.0
            && a.log().contains("address is not its Node's")
            && a.log().contains("no such Node")
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!("{e}\nA:\n{}\nimpostor:\n{}\ninvented:\n{}", a.log(), impostor.log(), invented.log())
    })?;
    // Both keep trying (a lonely node redials every 3 s): once A has refused them again, neither got in anywhere
    // and the bound members still see each other.
    let refused = a.metric("shoal_membership_refused_messages_total", &[]).await?;
    wait_for("A to refuse them again", Duration::from_secs(15), async || {
        a.metric("shoal_membership_refused_messages_total", &[]).await.unwrap_or(0.0) >= refused + 2.0
    })
    .await?;
    for x in [&a, &b] {
        assert_eq!(alive(x).await, 1.0, "only the other bound member is alive");
        assert_eq!(x.metric("shoal_peers", &["state=\"suspect\""]).await?, 0.0);
    }
    for x in [&impostor, &invented] {
        assert_eq!(alive(x).await, 0.0, "an unbound node learns of nobody: its join is refused");
    }
    // A third, properly bound node joins through the same bootstrap and is seen by all.
    // (127.0.0.93 is the impostor's address too: the impostor ran on node-3 all along; this agent's ports are
    // others.)
    let c = on(93, "node-3", &[&a])?.start().await?;
    wait_alive(&[&a, &b, &c], 2.0, Duration::from_secs(15)).await?;
    Ok(())
}
