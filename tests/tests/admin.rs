//! End to end: the `shoal` CLI (the real binary) against real agents' admin sockets — a 3-node mesh in front of a
//! real `docker-registry`.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::Result;
use shoal_testbed::cluster::{Cluster, wait_alive};
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, Containerd, shoal_bin};

fn n(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or_else(|| panic!("{path:?} in {v}"))
}

/// Each blob of `image` crossed from upstream exactly once (since the proxy's counts were last reset).
fn fetched_once(cl: &Cluster, image: &Artifact) {
    for blob in image.all_blobs() {
        let n = cl.proxy.count("GET", &blob.digest);
        assert_eq!(n, 1, "{} fetched {n} times from upstream", blob.digest);
    }
}

/// Every agent's node pulls `repo@digest` with containerd through the agent, and holds `image`'s blobs verified.
async fn every_node_pulls(cl: &Cluster, agents: &[&Agent], repo: &str, digest: &str, image: &Artifact) -> Result<()> {
    for agent in agents {
        let ctr = Containerd::start().await?;
        ctr.configure_host(&cl.proxy.host(), Some(&agent.url()))?;
        let out = ctr.pull(&format!("{}/{repo}@{digest}", cl.proxy.host()), None, &[]).await?;
        assert!(out.success, "pull failed: {}\n{}", out.output, agent.log());
        for blob in image.all_blobs() {
            assert!(ctr.has_verified(&blob.digest).await?, "{} not verified", blob.digest);
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_cli_shows_the_mesh_and_warms_nodes_with_bytes_that_add_up() -> Result<()> {
    let cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[2 << 20, 1 << 20, 300_000], 41, "amd64", Compression::Gzip)?);
    let digest = push(&image, &cl.registry.host(), "team/app", "v1", None, Format::Oci)?;
    let a = cl.agent(41, &[]).start().await?;
    let b = cl.agent(42, &[&a]).start().await?;
    let c = cl.agent(43, &[&a]).start().await?;
    wait_alive(&[&a, &b, &c], 2.0, Duration::from_secs(15)).await?;

    // The socket is the owner's alone.
    let mode = std::fs::metadata(a.data_dir().join("admin.sock"))?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    // Status and peers show the 3-node mesh.
    let s = a.cli_json(&["status"]).await?;
    assert_eq!(n(&s, &["members", "alive"]), 2, "{s}");
    assert!(!s["peer_id"].as_str().unwrap_or("").is_empty());
    let peers = a.cli_json(&["peers"]).await?;
    let peers = peers.as_array().expect("a list");
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(peers.iter().all(|p| p["state"] == "alive" && p["quarantined"] == false), "{peers:?}");
    // Each was heard from (membership messages) within the last few seconds.
    assert!(peers.iter().all(|p| p["last_heard_ms"].as_u64().is_some_and(|ms| ms < 10_000)), "{peers:?}");
    let (ok, table, _) = a.cli(&["peers"]).await?;
    assert!(ok && table.starts_with("PEER ID") && table.lines().count() == 3, "{table}");

    // A pull warms A: manifest, config and layers, each byte counted once by where it came from.
    let reference = format!("{}/team/app:v1", cl.proxy.host());
    let image_bytes: u64 = image.all_blobs().iter().map(|b| b.data.len() as u64).sum::<u64>()
        + match &image {
            Artifact::Image(i) => i.manifest.data.len() as u64,
            Artifact::Index { .. } => unreachable!("one image"),
        };
    let p = a.cli_json(&["pull", &reference]).await?;
    assert_eq!(p["digest"], digest.as_str(), "{p}");
    assert_eq!(n(&p, &["blobs"]), image.all_blobs().len() as u64 + 1, "{p}");
    assert_eq!(n(&p, &["bytes"]), image_bytes, "{p}");
    let from = ["store", "containerd", "peers", "upstream"].iter().map(|k| n(&p, &["from", k])).sum::<u64>();
    assert_eq!(from, image_bytes, "the bytes by source add up: {p}");
    assert!(n(&p, &["from", "upstream"]) + n(&p, &["from", "peers"]) > 0, "a cold pull came from somewhere: {p}");
    println!("$ shoal pull {reference} -o json\n{p:#}");
    // Again: all from A's store.
    let p = a.cli_json(&["pull", &reference]).await?;
    assert_eq!(n(&p, &["from", "store"]), image_bytes, "{p}");
    let blobs = a.cli_json(&["blobs"]).await?;
    let held: Vec<&str> = blobs.as_array().expect("a list").iter().filter_map(|b| b["digest"].as_str()).collect();
    for blob in image.all_blobs() {
        assert!(held.contains(&blob.digest.as_str()), "A lists {}: {held:?}", blob.digest);
    }
    // By repository: this one's manifest and blobs, none for another.
    let of_repo = a.cli_json(&["blobs", "--repo", "team/app"]).await?;
    assert_eq!(of_repo.as_array().map(Vec::len), Some(image.all_blobs().len() + 1), "{of_repo}");
    let none = a.cli_json(&["blobs", "--repo", "team/other"]).await?;
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let (ok, human, _) = a.cli(&["pull", &reference]).await?;
    assert!(ok && human.contains("pulled") && human.contains("store"), "{human}");
    // What an operator sees (docs/operations.md quotes it).
    for args in [&["status"][..], &["peers"], &["blobs"], &["images"]] {
        let (ok, out, err) = a.cli(args).await?;
        assert!(ok, "{err}");
        println!("$ shoal {}\n{out}", args.join(" "));
    }
    println!("$ shoal pull {reference}\n{human}");

    // Images: the tag, with every blob held.
    let imgs = a.cli_json(&["images"]).await?;
    let entry = imgs
        .as_array()
        .expect("a list")
        .iter()
        .find(|i| i["image"].as_str().is_some_and(|s| s.ends_with("team/app:v1")));
    let entry = entry.unwrap_or_else(|| panic!("team/app:v1 listed: {imgs}"));
    assert_eq!(entry["digest"], digest.as_str(), "{entry}");
    assert_eq!(n(entry, &["blobs"]), image.all_blobs().len() as u64, "{entry}");
    assert_eq!(n(entry, &["held"]), image.all_blobs().len() as u64, "{entry}");

    // Evict one layer, then it is gone; again: not found.
    let layer = &image.all_blobs()[1].digest;
    let e = a.cli_json(&["evict", layer]).await?;
    assert_eq!(n(&e, &["freed"]), image.all_blobs()[1].data.len() as u64);
    let (ok, _, err) = a.cli(&["evict", layer]).await?;
    assert!(!ok && err.contains("not found"), "{err}");
    let v = a.cli_json(&["verify"]).await?;
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");

    // Bad input gets a clear error naming the argument.
    let (ok, _, err) = a.cli(&["pull", "Not/A/Valid:Ref"]).await?;
    assert!(!ok && err.contains("invalid argument: image:"), "{err}");
    let (ok, _, err) = a.cli(&["pull", &format!("{}/team/nothing:v1", cl.proxy.host())]).await?;
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = a.cli(&["pull", &reference, "--platform", "linux"]).await?;
    assert!(!ok && err.contains("invalid argument: platform:"), "{err}");
    let (ok, _, err) = a.cli(&["evict", "sha256:nothex"]).await?;
    assert!(!ok && err.contains("invalid argument: digest:"), "{err}");
    let (ok, _, err) = tokio::process::Command::new(shoal_bin()?)
        .args(["status", "--socket", "/nonexistent/admin.sock"])
        .output()
        .await
        .map(|o| (o.status.success(), (), String::from_utf8_lossy(&o.stderr).into_owned()))?;
    assert!(!ok && err.contains("is the agent running"), "{err}");

    // Explain names where each blob came from: the members' bytes and upstream's add up to each blob's size.
    let x = a.cli_json(&["explain", &reference]).await?;
    println!("$ shoal explain {reference} -o json\n{x:#}");
    assert_eq!(x["digest"], digest.as_str(), "{x}");
    for blob in image.all_blobs().iter().filter(|b| b.digest != *layer) {
        let b = x["blobs"].as_array().expect("blobs").iter().find(|b| b["digest"] == blob.digest.as_str());
        let b = b.unwrap_or_else(|| panic!("{} explained: {x}", blob.digest));
        assert_eq!(b["recorded"], true, "{b}");
        let peers: u64 = b["from_peers"].as_array().expect("peers").iter().map(|p| n(p, &["bytes"])).sum();
        assert_eq!(peers + n(b, &["from_upstream"]), blob.data.len() as u64, "{b}");
        assert!(peers == 0 || b["from_peers"][0]["peer_id"].as_str().is_some_and(|p| p.starts_with("12D3")), "{b}");
    }
    let (ok, human, err) = a.cli(&["explain", &reference]).await?;
    assert!(ok, "{err}");
    println!("$ shoal explain {reference}\n{human}");

    // B warms from the members: what A and the homes hold, the rest from upstream, all counted.
    let p = b.cli_json(&["pull", &reference]).await?;
    let from = ["store", "containerd", "peers", "upstream"].iter().map(|k| n(&p, &["from", k])).sum::<u64>();
    assert_eq!(from, image_bytes, "{p}");
    // What B took from the members is what B's `peers` says it received, and what they say they sent it.
    let received: u64 =
        b.cli_json(&["peers"]).await?.as_array().expect("a list").iter().map(|p| n(p, &["bytes_received"])).sum();
    assert_eq!(received, n(&p, &["from", "peers"]), "{p}");
    let b_id = b.cli_json(&["status"]).await?["peer_id"].as_str().expect("an id").to_owned();
    let mut sent = 0;
    for x in [&a, &c] {
        let ps = x.cli_json(&["peers"]).await?;
        sent += ps
            .as_array()
            .expect("a list")
            .iter()
            .filter(|p| p["peer_id"] == b_id.as_str())
            .map(|p| n(p, &["bytes_sent"]))
            .sum::<u64>();
    }
    assert!(sent >= received, "sent {sent} to B, B received {received}");
    let s = b.cli_json(&["status"]).await?;
    assert!(n(&s, &["store", "blobs"]) >= image.all_blobs().len() as u64, "{s}");
    drop(c);
    Ok(())
}

#[tokio::test]
async fn preheat_warms_every_zone_through_the_homes_and_then_every_node_pulls_without_upstream() -> Result<()> {
    let mut cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[2 << 20, 700_000], 43, "amd64", Compression::Gzip)?);
    let digest = push(&image, &cl.registry.host(), "team/warm", "v1", None, Format::Oci)?;
    let zone = |z: &str| format!("\"{z}\"");
    let a1 = cl.agent(51, &[]).setting("zone", &zone("zone-a")).start().await?;
    let a2 = cl.agent(52, &[&a1]).setting("zone", &zone("zone-a")).start().await?;
    let b1 = cl.agent(53, &[&a1]).setting("zone", &zone("zone-b")).start().await?;
    let agents = [&a1, &a2, &b1];
    wait_alive(&agents, 2.0, Duration::from_secs(15)).await?;
    let reference = format!("{}/team/warm:v1", cl.proxy.host());

    // Bad input first: a zone nobody is in, an image upstream lacks.
    let (ok, _, err) = a2.cli(&["preheat", &reference, "--zones", "zone-x"]).await?;
    assert!(!ok && err.contains("invalid argument: zones:"), "{err}");
    let (ok, _, err) = a2.cli(&["preheat", &format!("{}/team/none:v1", cl.proxy.host())]).await?;
    assert!(!ok && err.contains("not found"), "{err}");

    cl.proxy.reset_counts();
    let p = a2.cli_json(&["preheat", &reference, "--pin"]).await?;
    assert_eq!((p["pinned"].as_bool(), n(&p, &["members_told"])), (Some(true), 2), "{p}");
    for agent in agents {
        let pins = agent.cli_json(&["pins"]).await?;
        assert_eq!(pins["pins"][0]["image"], reference.as_str(), "{pins}");
    }
    println!("$ shoal preheat {reference} -o json\n{p:#}");
    assert_eq!(p["digest"], digest.as_str(), "{p}");
    let zones = p["zones"].as_array().expect("zones");
    assert_eq!(zones.len(), 2, "{p}");
    for z in zones {
        assert_eq!(z["failure"], "", "{p}");
        assert_eq!(z["ready"], z["blobs"], "{p}");
    }
    // Each layer crossed from upstream once for the whole cluster (the far zone's home takes it from the home zone).
    fetched_once(&cl, &image);

    // Replicas: 2 holders of every blob in zone-a (both its members), zone-b's one member; still one crossing.
    let (ok, _, err) = a2.cli(&["preheat", &reference, "--replicas", "17"]).await?;
    assert!(!ok && err.contains("invalid argument: replicas:"), "{err}");
    let more = Artifact::Image(Image::random(&[1_500_000, 600_000], 49, "amd64", Compression::Gzip)?);
    push(&more, &cl.registry.host(), "team/twice", "v1", None, Format::Oci)?;
    let twice = format!("{}/team/twice:v1", cl.proxy.host());
    let r = b1.cli_json(&["preheat", &twice, "--replicas", "2"]).await?;
    assert!(
        r["zones"].as_array().expect("zones").iter().all(|z| z["failure"] == "" && z["ready"] == z["blobs"]),
        "{r}"
    );
    for agent in agents {
        let blobs = agent.cli_json(&["blobs"]).await?;
        let held: Vec<&str> = blobs.as_array().expect("a list").iter().filter_map(|b| b["digest"].as_str()).collect();
        for blob in more.all_blobs() {
            assert!(held.contains(&blob.digest.as_str()), "{} not held by {}: {held:?}", blob.digest, agent.url());
        }
    }
    fetched_once(&cl, &more);

    // Upstream gone: every node's containerd pulls the image from the cluster.
    cl.stop_upstream().await;
    every_node_pulls(&cl, &agents, "team/warm", &digest, &image).await?;
    Ok(())
}

#[tokio::test]
async fn a_pin_is_told_to_every_member_survives_gc_and_restarts_and_is_refused_past_the_budget() -> Result<()> {
    let cl = Cluster::start().await?;
    let pinned = Artifact::Image(Image::random(&[1_500_000, 500_000], 44, "amd64", Compression::Gzip)?);
    let other = Artifact::Image(Image::random(&[1_500_000, 500_000], 45, "amd64", Compression::Gzip)?);
    push(&pinned, &cl.registry.host(), "team/keep", "v1", None, Format::Oci)?;
    push(&other, &cl.registry.host(), "team/other", "v1", None, Format::Oci)?;
    let a = cl.agent(61, &[]).start().await?;
    // B's budget: GC above 0.9 × 4 MiB, down to 0.8 × 4 MiB: both images do not fit.
    let mut b = cl.agent(62, &[&a]).setting("disk_budget", "\"4MiB\"").start().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    let keep = format!("{}/team/keep:v1", cl.proxy.host());
    let other_ref = format!("{}/team/other:v1", cl.proxy.host());

    // Pinned on A: A pulls it and tells B.
    let p = a.cli_json(&["pin", &keep]).await?;
    assert_eq!((n(&p, &["members_told"]), n(&p, &["members_alive"])), (1, 1), "{p}");
    assert_eq!(p["pin"]["image"], keep.as_str(), "{p}");
    let pins = b.cli_json(&["pins"]).await?;
    assert_eq!(pins["pins"].as_array().map(Vec::len), Some(1), "B was told: {pins}");

    // B holds the pinned image, then the other one: GC must make room and keeps every pinned blob.
    b.cli_json(&["pull", &keep]).await?;
    b.cli_json(&["pull", &other_ref]).await?;
    let held = || async {
        let blobs = b.cli_json(&["blobs"]).await?;
        Ok::<Vec<String>, anyhow::Error>(
            blobs.as_array().expect("a list").iter().filter_map(|x| x["digest"].as_str().map(str::to_owned)).collect(),
        )
    };
    let evicted = shoal_testbed::wait_for("GC on B", Duration::from_secs(20), async || {
        let h = held().await.unwrap_or_default();
        other.all_blobs().iter().any(|x| !h.contains(&x.digest))
    })
    .await;
    let h = held().await?;
    assert!(evicted.is_ok(), "GC evicted none of the other image: {h:?}\n{}", b.log());
    for x in pinned.all_blobs() {
        assert!(h.contains(&x.digest), "pinned {} evicted: {h:?}", x.digest);
    }
    // A pinned blob cannot be evicted by hand either.
    let (ok, _, err) = b.cli(&["evict", &pinned.all_blobs()[1].digest]).await?;
    assert!(!ok && err.contains("pinned by"), "{err}");
    // Past the budget: refused with the numbers.
    let (ok, _, err) = b.cli(&["pin", &other_ref]).await?;
    assert!(!ok && err.contains("budget") && err.contains("pinned already"), "{err}");

    // A restart keeps the pin and the blobs.
    b.restart().await?;
    wait_alive(&[&a, &b], 1.0, Duration::from_secs(15)).await?;
    let pins = b.cli_json(&["pins"]).await?;
    assert_eq!(pins["pins"][0]["image"], keep.as_str(), "{pins}");
    assert_eq!(n(&pins["pins"][0], &["held"]), n(&pins["pins"][0], &["bytes"]), "{pins}");
    let s = b.cli_json(&["status"]).await?;
    assert_eq!(
        n(&s, &["store", "pinned_bytes"]),
        n(&pins["pins"][0], &["bytes"]),
        "status counts the pinned bytes: {s}"
    );

    // A member that was not there when the pin was told learns it from the others' exchange.
    let c = cl.agent(63, &[&a]).start().await?;
    shoal_testbed::wait_for("C to learn the pin", Duration::from_secs(30), async || {
        c.cli_json(&["pins"]).await.is_ok_and(|p| p["pins"][0]["image"] == keep.as_str())
    })
    .await?;

    // Unpinned on A: B is told.
    let u = a.cli_json(&["unpin", &keep]).await?;
    assert_eq!(n(&u, &["members_told"]), 2, "{u}");
    let pins = b.cli_json(&["pins"]).await?;
    assert_eq!(pins["pins"].as_array().map(Vec::len), Some(0), "{pins}");
    let (ok, _, err) = a.cli(&["unpin", &keep]).await?;
    assert!(!ok && err.contains("not pinned"), "{err}");
    Ok(())
}

#[tokio::test]
async fn an_image_cache_is_preheated_pinned_and_reported_by_the_home_of_its_name_and_unpinned_when_deleted()
-> Result<()> {
    use shoal_testbed::kube::FakeApi;
    let cl = Cluster::start().await?;
    let image = Artifact::Image(Image::random(&[1_200_000, 400_000], 46, "amd64", Compression::Gzip)?);
    let digest = push(&image, &cl.registry.host(), "team/cached", "v1", None, Format::Oci)?;
    let api = FakeApi::start(Vec::new()).await?;
    let on = |n: u8, zone: &str, peers: &[&Agent]| -> Result<shoal_testbed::AgentBuilder> {
        Ok(cl
            .agent(n, peers)
            .setting("zone", &format!("\"{zone}\""))
            .setting("image_caches", "true")
            .env("KUBECONFIG", &api.kubeconfig_with_token(&format!("agent-{n}"))?))
    };
    let a1 = on(71, "zone-a", &[])?.start().await?;
    let a2 = on(72, "zone-a", &[&a1])?.start().await?;
    let b1 = on(73, "zone-b", &[&a1])?.start().await?;
    let agents = [&a1, &a2, &b1];
    wait_alive(&agents, 2.0, Duration::from_secs(15)).await?;
    let reference = format!("{}/team/cached:v1", cl.proxy.host());
    let logs = || agents.iter().map(|a| a.log()).collect::<Vec<_>>().join("\n----\n");

    // A spec the agents cannot act on: the status says why, naming the field; nothing is fetched.
    cl.proxy.reset_counts();
    api.put_image_cache("apps", "bad", serde_json::json!({"images": [reference], "imagePullSecrets": [{"name": "s"}]}));
    shoal_testbed::wait_for("the refusal in the status", Duration::from_secs(20), async || {
        api.image_cache("apps", "bad").is_some_and(|o| {
            o["status"]["message"].as_str().is_some_and(|m| m.starts_with("spec.imagePullSecrets: not supported"))
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    api.put_image_cache("apps", "warm", serde_json::json!({"images": [reference], "pin": true}));
    let ready = |o: &serde_json::Value| {
        o["status"]["images"][0]["zones"]
            .as_array()
            .is_some_and(|zs| zs.len() == 2 && zs.iter().all(|z| z["state"] == "Ready"))
    };
    shoal_testbed::wait_for("both zones Ready", Duration::from_secs(60), async || {
        api.image_cache("apps", "warm").is_some_and(|o| ready(&o))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{:?}\n{}", api.image_cache("apps", "warm"), logs()))?;
    let obj = api.image_cache("apps", "warm").expect("there");
    println!("status: {:#}", obj["status"]);
    assert_eq!(obj["status"]["observedGeneration"], 1, "{obj}");
    assert_eq!(obj["status"]["images"][0]["digest"], digest.as_str(), "{obj}");
    assert_eq!(obj["status"]["images"][0]["pinned"], true, "{obj}");
    let mut zones: Vec<&str> = obj["status"]["images"][0]["zones"]
        .as_array()
        .expect("zones")
        .iter()
        .filter_map(|z| z["zone"].as_str())
        .collect();
    zones.sort_unstable();
    assert_eq!(zones, ["zone-a", "zone-b"]);
    // One agent writes each object's status: the home of its name (Fetching, then Ready).
    for name in ["bad", "warm"] {
        let mut writers = api.status_writers("apps", name);
        writers.dedup();
        assert_eq!(writers.len(), 1, "{name}: {writers:?}");
    }
    // Each layer crossed from upstream once; every member holds the pin.
    fetched_once(&cl, &image);
    for agent in agents {
        let pins = agent.cli_json(&["pins"]).await?;
        assert_eq!(pins["pins"][0]["image"], reference.as_str(), "{pins}");
    }

    // Deleted: unpinned on every member.
    api.delete_image_cache("apps", "warm");
    for agent in agents {
        shoal_testbed::wait_for("the pin gone", Duration::from_secs(20), async || {
            agent.cli_json(&["pins"]).await.is_ok_and(|p| p["pins"].as_array().is_some_and(Vec::is_empty))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.log()))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_rollouts_new_image_is_fetched_once_by_each_zone_before_any_node_pulls_it() -> Result<()> {
    use shoal_testbed::kube::FakeApi;
    let mut cl = Cluster::start().await?;
    let old = Artifact::Image(Image::random(&[900_000, 300_000], 47, "amd64", Compression::Gzip)?);
    let new = Artifact::Image(Image::random(&[1_100_000, 300_000], 48, "amd64", Compression::Gzip)?);
    push(&old, &cl.registry.host(), "team/web", "v1", None, Format::Oci)?;
    let digest = push(&new, &cl.registry.host(), "team/web", "v2", None, Format::Oci)?;
    let (v1, v2) = (format!("{}/team/web:v1", cl.proxy.host()), format!("{}/team/web:v2", cl.proxy.host()));
    let api = FakeApi::start(Vec::new()).await?;
    // There before the agents: the first list only records it.
    api.put_workload("Deployment", "shop", "web", &[&v1]);
    let on = |n: u8, zone: &str, peers: &[&Agent]| -> Result<shoal_testbed::AgentBuilder> {
        Ok(cl
            .agent(n, peers)
            .setting("zone", &format!("\"{zone}\""))
            .setting("prefetch_rollouts", "true")
            .env("KUBECONFIG", api.kubeconfig_env()?))
    };
    let a1 = on(81, "zone-a", &[])?.start().await?;
    let a2 = on(82, "zone-a", &[&a1])?.start().await?;
    let b1 = on(83, "zone-b", &[&a1])?.start().await?;
    let agents = [&a1, &a2, &b1];
    wait_alive(&agents, 2.0, Duration::from_secs(15)).await?;
    let logs = || agents.iter().map(|a| a.log()).collect::<Vec<_>>().join("\n----\n");
    let count = |needle: &str| agents.iter().map(|a| a.log().matches(needle).count()).sum::<usize>();
    // One watcher per zone, each having listed the workloads (the first agent watched zone-a alone for a moment,
    // until the second one joined and took the role).
    let watching = |a: &Agent| {
        let log = a.log();
        log.rfind("watching rollouts for this zone")
            .is_some_and(|w| log.rfind("no longer this zone's").is_none_or(|n| n < w))
            && log.contains("Deployments listed objects=1")
    };
    shoal_testbed::wait_for("a watcher per zone", Duration::from_secs(30), async || {
        agents.iter().filter(|a| watching(a)).count() == 2
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    cl.proxy.reset_counts();
    api.put_workload("Deployment", "shop", "web", &[&v2]);
    shoal_testbed::wait_for("both zones prefetched", Duration::from_secs(60), async || {
        count("rollout: prefetched") == 2
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    // The old image was never fetched; each blob of the new one crossed from upstream once for the cluster.
    for blob in old.all_blobs() {
        assert_eq!(cl.proxy.count("GET", &blob.digest), 0, "{} of the old image fetched", blob.digest);
    }
    fetched_once(&cl, &new);
    // Upstream gone: every node's containerd pulls the new image from the cluster.
    cl.stop_upstream().await;
    every_node_pulls(&cl, &agents, "team/web", &digest, &new).await?;
    Ok(())
}

#[tokio::test]
async fn a_private_image_without_the_agents_credentials_and_another_users_connection_are_refused() -> Result<()> {
    use shoal_testbed::{Proxy, Registry};
    let registry = Registry::start_private("alice", "wonderland").await?;
    let proxy = Proxy::start(registry.addr()).await?;
    let agent = Agent::builder().registry(&proxy.host()).start().await?;
    let image = Artifact::Image(Image::random(&[300_000], 50, "amd64", Compression::Gzip)?);
    push(&image, &registry.host(), "private/app", "v1", registry.creds_arg().as_deref(), Format::Oci)?;
    let reference = format!("{}/private/app:v1", proxy.host());
    // The admin API never takes a client's credentials, and the agent has none for this registry: refused, and
    // nothing is stored.
    for args in [&["pull", &reference][..], &["pin", &reference]] {
        let (ok, _, err) = agent.cli(args).await?;
        assert!(!ok && err.contains("credentials"), "{args:?}: {err}");
    }
    let blobs = agent.cli_json(&["blobs"]).await?;
    assert_eq!(blobs.as_array().map(Vec::len), Some(0), "{blobs}");

    // Another user: the socket's mode keeps it out…
    let socket = agent.data_dir().join("admin.sock");
    let as_nobody = || async {
        let out = tokio::process::Command::new(shoal_bin()?)
            .args(["status", "--socket"])
            .arg(&socket)
            .uid(65534)
            .gid(65534)
            .output()
            .await?;
        Ok::<_, anyhow::Error>((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (ok, err) = as_nobody().await?;
    assert!(!ok && err.contains("admin socket"), "{err}");
    // …and with the mode widened (a mistake, or a directory another user can reach), the agent refuses it by its
    // peer credentials.
    for dir in
        socket.ancestors().skip(1).take_while(|d| d.starts_with(std::env::temp_dir()) && *d != std::env::temp_dir())
    {
        let mode = std::fs::metadata(dir)?.permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o111))?;
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let (ok, err) = as_nobody().await?;
    assert!(!ok, "another user was served: {err}");
    shoal_testbed::wait_for("the refusal logged", Duration::from_secs(5), async || {
        agent.log().contains("admin socket: a connection from another user refused")
    })
    .await?;
    // Root (the owner) is still served.
    agent.cli_json(&["status"]).await?;
    Ok(())
}
