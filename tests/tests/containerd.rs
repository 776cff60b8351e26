//! containerd's content store shared through the agent: a real containerd 1.6 pulls an image straight from
//! upstream (not through Shoal); its agent then serves those blobs, from containerd's store and without a copy of
//! its own, to another containerd and to a peer, with upstream stopped; deleting the image stops the offer; a
//! lease keeps a blob from containerd's GC while a peer's transfer reads it.

use std::time::Duration;

use anyhow::Result;
use shoal_testbed::cluster::{Cluster, wait_alive};
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, Containerd, sha256_digest, wait_for};

async fn get(url: &str) -> Result<(u16, Vec<u8>)> {
    let resp = reqwest::Client::builder().no_proxy().build()?.get(url).send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.bytes().await?.to_vec()))
}

/// A containerd that pulled `reference` directly from upstream (no mirror in its hosts file).
async fn pulled_directly(host: &str, reference: &str) -> Result<Containerd> {
    let c = Containerd::start().await?;
    c.configure_host(host, None)?;
    let out = c.pull(reference, None, &[]).await?;
    assert!(out.success, "direct pull failed: {}", out.output);
    Ok(c)
}

/// Waits until the agent offers `n` blobs (manifests included) of its containerd's images.
async fn wait_offered(agent: &Agent, n: usize) -> Result<()> {
    wait_for(&format!("the agent to offer {n} blobs of containerd's"), Duration::from_secs(20), async || {
        agent.metric("shoal_containerd_blobs", &[]).await.is_ok_and(|v| v == n as f64)
    })
    .await
}

#[tokio::test]
async fn blobs_containerd_pulled_directly_are_served_to_a_second_containerd_and_a_peer_with_upstream_stopped()
-> Result<()> {
    let mut cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[1_500_000, 300_000], 51, "amd64", Compression::Gzip)?);
    let manifest = push(&image, &cl.registry.host(), "team/app", "v1", None, Format::Oci)?;
    let host = cl.proxy.host();
    let tagged = format!("{host}/team/app:v1");
    let total: usize = image.all_blobs().iter().map(|b| b.data.len()).sum::<usize>() + image.top().data.len();
    let node_a = pulled_directly(&host, &tagged).await?;
    assert!(cl.proxy.counts().values().sum::<usize>() > 0, "the direct pull went to upstream");

    let a = cl.agent(71, &[]).containerd(&node_a).start().await?;
    let b = cl.agent(72, &[&a]).start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_offered(&a, image.all_blobs().len() + 1).await?;
    cl.stop_upstream().await;

    // A second containerd on A's node pulls by tag through A: the tag from containerd's image, every blob from
    // containerd's store.
    let second = Containerd::start().await?;
    second.configure_host(&host, Some(&a.url()))?;
    let out = second.pull(&tagged, None, &[]).await?;
    assert!(out.success, "pull through A with upstream stopped failed: {}", out.output);
    for blob in image.all_blobs() {
        assert!(second.has_verified(&blob.digest).await?, "second containerd lacks {}", blob.digest);
    }
    assert_eq!(a.metric("shoal_store_blobs", &[]).await?, 0.0, "A served containerd's copies without its own");
    let from_containerd = a.metric("shoal_bytes_served_total", &["source=\"containerd\""]).await?;
    assert_eq!(from_containerd, total as f64, "every byte came out of containerd's store");

    // A containerd on B's node pulls by digest through B: the blobs cross the mesh from A's containerd.
    let third = Containerd::start().await?;
    third.configure_host(&host, Some(&b.url()))?;
    let out = third.pull(&format!("{host}/team/app@{manifest}"), None, &[]).await?;
    assert!(out.success, "pull through B with upstream stopped failed: {}", out.output);
    for blob in image.all_blobs() {
        assert!(third.has_verified(&blob.digest).await?, "third containerd lacks {}", blob.digest);
    }
    assert!(b.metric("shoal_peer_received_bytes_total", &[]).await? >= total as f64);
    Ok(())
}

#[tokio::test]
async fn deleting_the_image_in_containerd_stops_the_offer() -> Result<()> {
    let mut cl = Cluster::start().await?;
    let image = Image::random(&[400_000, 500_000], 52, "amd64", Compression::Gzip)?;
    let artifact = Artifact::Image(image.clone());
    push(&artifact, &cl.registry.host(), "team/gone", "v1", None, Format::Oci)?;
    let host = cl.proxy.host();
    let tagged = format!("{host}/team/gone:v1");
    let node_a = pulled_directly(&host, &tagged).await?;
    let a = cl.agent(73, &[]).containerd(&node_a).start().await?;
    let b = cl.agent(74, &[&a]).start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_offered(&a, artifact.all_blobs().len() + 1).await?;
    cl.stop_upstream().await;

    // Offered: B gets the first layer over the mesh.
    let (first, second) = (&image.layers[0], &image.layers[1]);
    let (status, body) = get(&cl.blob_url(&b, "team/gone", &first.digest)).await?;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), first.digest);

    node_a.remove_image(&tagged).await?;
    wait_offered(&a, 0).await?;
    // No longer offered: neither A's own mirror nor B (which never fetched it) can serve the second layer.
    let (status, _) = get(&cl.blob_url(&a, "team/gone", &second.digest)).await?;
    assert_ne!(status, 200, "A still serves a deleted image's layer");
    let (status, _) = get(&cl.blob_url(&b, "team/gone", &second.digest)).await?;
    assert_ne!(status, 200, "B was still given a deleted image's layer");
    Ok(())
}

#[tokio::test]
async fn a_lease_keeps_a_blob_through_containerds_gc_while_a_peer_reads_it() -> Result<()> {
    let mut cl = Cluster::start().await?;
    let image = Image::random(&[8 << 20], 53, "amd64", Compression::Gzip)?;
    let artifact = Artifact::Image(image.clone());
    push(&artifact, &cl.registry.host(), "team/big", "v1", None, Format::Oci)?;
    let host = cl.proxy.host();
    let tagged = format!("{host}/team/big:v1");
    let node_a = pulled_directly(&host, &tagged).await?;
    // A's uploads crawl (2 MiB/s), so the transfer spans the GC below.
    let a = cl.agent(75, &[]).containerd(&node_a).setting("upload_rate", "\"2MiB\"").start().await?;
    let b = cl.agent(76, &[&a]).setting("peer_stall_timeout", "\"10s\"").start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    wait_offered(&a, artifact.all_blobs().len() + 1).await?;
    cl.stop_upstream().await;

    let layer = image.layers[0].clone();
    let url = cl.blob_url(&b, "team/big", &layer.digest);
    let transfer = tokio::spawn(async move { get(&url).await });
    // Mid-transfer: B has some pieces, far from all.
    wait_for("B to receive part of the layer", Duration::from_secs(20), async || {
        b.metric("shoal_peer_received_bytes_total", &[]).await.is_ok_and(|v| v >= (1 << 20) as f64)
    })
    .await?;
    assert!(node_a.leases().await?.lines().count() > 1, "A holds a lease on the layer it serves");
    // The image goes, and containerd's GC runs before this returns: only the lease keeps the layer.
    node_a.remove_image(&tagged).await?;
    assert!(
        b.metric("shoal_peer_received_bytes_total", &[]).await? < layer.data.len() as f64,
        "the GC ran while the transfer was still going"
    );
    let (status, body) = transfer.await??;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), layer.digest, "the layer arrived whole through containerd's GC");
    assert!(node_a.has_verified(&layer.digest).await?, "the leased layer is still in containerd's store");
    Ok(())
}

#[tokio::test]
async fn the_agent_points_containerd_at_itself_and_restore_puts_the_operators_file_back() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[200_000], 54, "amd64", Compression::Gzip)?);
    push(&image, &cl.registry.host(), "team/hosts", "v1", None, Format::Oci)?;
    let host = cl.proxy.host();
    let node = Containerd::start().await?;
    // The operator's file: the registry itself, plus a host of theirs (unreachable: containerd skips it).
    let rdir = node.hosts_dir().join(&host);
    std::fs::create_dir_all(&rdir)?;
    let theirs = format!(
        "# the operator's\nserver = \"http://{host}\"\n\n[host.\"http://127.0.0.1:9\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    std::fs::write(rdir.join("hosts.toml"), &theirs)?;
    let agent = Agent::builder()
        .registry(&host)
        .setting("containerd_hosts_dir", &format!("{:?}", node.hosts_dir()))
        .setting("allow_unlisted_registries", "false")
        .start()
        .await?;

    let written = std::fs::read_to_string(rdir.join("hosts.toml"))?;
    let (ours, operators) = (written.find(&agent.url()), written.find("127.0.0.1:9"));
    assert!(
        ours.is_some() && operators.is_some() && ours < operators,
        "the mirror first, theirs kept after:\n{written}"
    );
    // containerd 1.6 pulls through the file the agent wrote (with its dial_timeout), so through the agent.
    let out = node.pull(&format!("{host}/team/hosts:v1"), None, &[]).await?;
    assert!(out.success, "{}", out.output);
    let served = agent.metric("shoal_bytes_served_total", &["source=\"download\""]).await?;
    assert!(
        served >= image.all_blobs().iter().map(|b| b.data.len()).sum::<usize>() as f64,
        "the pull went through the agent"
    );

    let restore = std::process::Command::new(shoal_testbed::shoal_bin()?)
        .args(["restore-hosts", "--hosts-dir"])
        .arg(node.hosts_dir())
        .output()?;
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    assert_eq!(std::fs::read_to_string(rdir.join("hosts.toml"))?, theirs, "the operator's file, byte for byte");
    assert_eq!(std::fs::read_dir(&rdir)?.count(), 1, "no backup left behind");
    Ok(())
}
