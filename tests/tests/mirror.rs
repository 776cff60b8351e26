//! End to end on one node: a real containerd pulls through a real `shoal agent` from a real `docker-registry`.
//!
//! Upstream is reached through the testbed's counting [`Proxy`], so each test can say how many times upstream
//! was asked for each blob, and make upstream lie or crawl.

use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::{Agent, Containerd, Fault, Proxy, Registry, sha256_digest};

/// Upstream registry + counting proxy + an agent that proxies the proxy's host.
struct Node {
    registry: Registry,
    proxy: Proxy,
    agent: Agent,
}

async fn node_with(
    registry: Registry,
    configure: impl FnOnce(shoal_testbed::AgentBuilder) -> shoal_testbed::AgentBuilder,
) -> Result<Node> {
    let proxy = Proxy::start(registry.addr()).await?;
    let agent = configure(Agent::builder().registry(&proxy.host())).start().await?;
    Ok(Node { registry, proxy, agent })
}

async fn node() -> Result<Node> {
    node_with(Registry::start().await?, |b| b).await
}

async fn containerd_for(node: &Node) -> Result<Containerd> {
    let c = Containerd::start().await?;
    c.configure_host(&node.proxy.host(), Some(&node.agent.url()))?;
    Ok(c)
}

fn blob_url(node: &Node, repo: &str, digest: &str) -> String {
    format!("{}/v2/{repo}/blobs/{digest}?ns={}", node.agent.url(), node.proxy.host())
}

async fn assert_pulled(c: &Containerd, artifact: &Artifact) -> Result<()> {
    for b in artifact.all_blobs() {
        assert!(c.has_verified(&b.digest).await?, "containerd lacks a verified {}", b.digest);
    }
    Ok(())
}

#[tokio::test]
async fn cold_pull_fetches_each_blob_once_then_pulls_offline() -> Result<()> {
    // Tags always revalidated: the offline pull must take the stale-if-error path.
    let mut n = node_with(Registry::start().await?, |b| b.setting("tag_ttl", "\"0s\"")).await?;
    let image = Artifact::Image(Image::random(&[300_000, 2_000_000, 50_000], 1, "amd64", Compression::Gzip)?);
    push(&image, &n.registry.host(), "team/app", "v1", None, Format::Oci)?;
    n.proxy.reset_counts();

    let reference = format!("{}/team/app:v1", n.proxy.host());
    let c1 = containerd_for(&n).await?;
    let out = c1.pull(&reference, None, &[]).await?;
    assert!(out.success, "pull failed: {}\nagent log:\n{}", out.output, n.agent.log());
    assert_pulled(&c1, &image).await?;

    // Every blob was fetched from upstream exactly once, and everything the client got came through the agent.
    for b in image.all_blobs() {
        assert_eq!(n.proxy.count("GET", &format!("/blobs/{}", b.digest)), 1, "upstream GETs of {}", b.digest);
    }
    let served = n.agent.metric("shoal_bytes_served_total", &["source=\"download\""]).await?;
    assert!(served >= image.all_blobs().iter().map(|b| b.data.len()).sum::<usize>() as f64, "served {served}");

    // Upstream gone: a second containerd with a fresh root pulls the same tag from the cache alone.
    n.proxy.stop();
    n.registry.stop().await;
    let c2 = containerd_for(&n).await?;
    let out = c2.pull(&reference, None, &[]).await?;
    assert!(out.success, "offline pull failed: {}\nagent log:\n{}", out.output, n.agent.log());
    assert_pulled(&c2, &image).await?;
    assert!(n.agent.metric("shoal_cache_lookups_total", &["kind=\"tag\"", "result=\"stale\""]).await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn concurrent_cold_clients_share_one_upstream_fetch() -> Result<()> {
    let n = node().await?;
    let image = Artifact::Image(Image::random(&[64 << 20], 3, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "big/blob", "v1", None, Format::Oci)?;
    n.proxy.reset_counts();
    let layer = image.all_blobs()[1].clone();
    let url = blob_url(&n, "big/blob", &layer.digest);

    let http = reqwest::Client::new();
    let gets = (0..8).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let resp = http.get(&url).send().await?;
            anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
            Ok::<_, anyhow::Error>(resp.bytes().await?)
        }
    });
    let bodies = futures_util::future::join_all(gets).await;
    for b in bodies {
        assert_eq!(sha256_digest(&b?), layer.digest);
    }
    assert_eq!(n.proxy.count("GET", &format!("/blobs/{}", layer.digest)), 1);
    Ok(())
}

#[tokio::test]
async fn sigkill_mid_download_leaves_nothing_partial() -> Result<()> {
    let mut n = node().await?;
    let image = Artifact::Image(Image::random(&[8 << 20], 4, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "crash/me", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    // Upstream crawls, so the download is surely in progress when the agent dies.
    n.proxy.set_fault(Fault::Throttle(2 << 20));
    let resp = reqwest::get(blob_url(&n, "crash/me", &layer.digest)).await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = 0usize;
    while got < 1 << 20 {
        got += body.next().await.expect("body continues")?.len();
    }
    n.agent.kill().await;
    let mut rest_ok = true;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(_) => {
                rest_ok = false;
                break;
            }
        }
    }
    assert!(!rest_ok || got < layer.data.len(), "the killed agent delivered a whole body");

    n.agent.restart().await?;
    let partial_dir = n.agent.data_dir().join("partial");
    assert_eq!(std::fs::read_dir(&partial_dir)?.count(), 0, "partials survive a restart");
    assert!(!n.agent.data_dir().join("blobs/sha256").join(&layer.digest[7..9]).join(&layer.digest[7..]).exists());
    assert!(n.agent.log().contains("partials=1"), "restart did not reconcile the partial:\n{}", n.agent.log());

    n.proxy.set_fault(Fault::None);
    let c = containerd_for(&n).await?;
    let out = c.pull(&format!("{}/crash/me:v1", n.proxy.host()), None, &[]).await?;
    assert!(out.success, "pull after restart failed: {}", out.output);
    assert_pulled(&c, &image).await?;
    Ok(())
}

#[tokio::test]
async fn lying_upstream_is_never_cached_or_fully_served() -> Result<()> {
    let n = node().await?;
    let image = Artifact::Image(Image::random(&[3 << 20], 5, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "liar/img", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    let url = blob_url(&n, "liar/img", &layer.digest);

    n.proxy.set_fault(Fault::CorruptBlobs);
    let resp = reqwest::get(&url).await?;
    // The agent only knows the content is wrong at the end: the body must then break, never complete.
    let body = resp.bytes().await;
    match body {
        Ok(b) => panic!("a corrupt blob was delivered whole ({} bytes)", b.len()),
        Err(e) => assert!(e.is_body() || e.is_decode() || e.is_request(), "unexpected error {e}"),
    }
    assert_eq!(n.agent.metric("shoal_verify_failures_total", &[]).await?, 1.0);
    assert_eq!(n.agent.metric("shoal_store_blobs", &[]).await?, 0.0);
    // A range of the blob (containerd 2.x reads layers in parallel ranges) gets its last byte only once the whole
    // blob matched its digest: never a clean 206 of bytes that turn out wrong.
    let ranged = reqwest::Client::new().get(&url).header("range", "bytes=0-99").send().await?;
    assert_eq!(ranged.status(), 206);
    match ranged.bytes().await {
        Ok(b) => panic!("a range of a corrupt blob was delivered whole ({} bytes)", b.len()),
        Err(e) => assert!(e.is_body() || e.is_decode() || e.is_request(), "unexpected error {e}"),
    }
    assert_eq!(n.agent.metric("shoal_verify_failures_total", &[]).await?, 2.0);

    n.proxy.set_fault(Fault::None);
    let body = reqwest::get(&url).await?.bytes().await?;
    assert_eq!(sha256_digest(&body), layer.digest);
    // The client gets its last byte once the hash matched; the commit (fsync, rename, record) follows.
    shoal_testbed::wait_for("the commit", Duration::from_secs(10), async || {
        n.agent.metric("shoal_store_commits_total", &[]).await.unwrap_or(0.0) == 1.0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn private_registry_needs_the_clients_credentials() -> Result<()> {
    let n = node_with(Registry::start_private("alice", "wonderland").await?, |b| b).await?;
    let image = Artifact::Image(Image::random(&[400_000, 100_000], 6, "amd64", Compression::Gzip)?);
    push(&image, &n.registry.host(), "private/app", "v1", n.registry.creds_arg().as_deref(), Format::Oci)?;
    let reference = format!("{}/private/app:v1", n.proxy.host());

    let c1 = containerd_for(&n).await?;
    let out = c1.pull(&reference, Some("alice:wonderland"), &[]).await?;
    assert!(out.success, "authenticated pull failed: {}\n{}", out.output, n.agent.log());
    assert_pulled(&c1, &image).await?;
    assert!(n.agent.metric("shoal_bytes_served_total", &["source=\"download\""]).await? > 0.0);

    // Cached now; a client without credentials, or with wrong ones, gets the registry's challenge, not the bytes.
    let layer = image.all_blobs()[1].clone();
    let url = blob_url(&n, "private/app", &layer.digest);
    let http = reqwest::Client::new();
    for auth in [None, Some(("alice", "guess"))] {
        let mut rb = http.get(&url);
        if let Some((u, p)) = auth {
            rb = rb.basic_auth(u, Some(p));
        }
        let resp = rb.send().await?;
        assert_eq!(resp.status(), 401, "auth {auth:?}");
        assert!(resp.headers().get("www-authenticate").is_some_and(|v| v.to_str().unwrap_or("").starts_with("Basic")));
        let body = resp.bytes().await?;
        assert!(String::from_utf8_lossy(&body).contains("UNAUTHORIZED"));
    }
    let tag_url = format!("{}/v2/private/app/manifests/v1?ns={}", n.agent.url(), n.proxy.host());
    assert_eq!(http.head(&tag_url).send().await?.status(), 401);

    // The right credentials get the cached bytes.
    let body = http.get(&url).basic_auth("alice", Some("wonderland")).send().await?.bytes().await?;
    assert_eq!(sha256_digest(&body), layer.digest);

    // And containerd without credentials cannot pull through the mirror (nor from upstream directly).
    let c2 = containerd_for(&n).await?;
    let out = c2.pull(&reference, None, &[]).await?;
    assert!(!out.success, "an unauthenticated pull succeeded");

    // An agent given the registry's credentials by its operator (a node-wide pull secret) answers the Basic
    // challenge itself: its clients need none.
    let dir = tempfile::tempdir()?;
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "alice:wonderland\n")?;
    let agent = Agent::builder().registry_with_credentials(&n.proxy.host(), &creds).start().await?;
    let c3 = Containerd::start().await?;
    c3.configure_host(&n.proxy.host(), Some(&agent.url()))?;
    let out = c3.pull(&reference, None, &[]).await?;
    assert!(out.success, "pull with the agent's own credentials failed: {}\n{}", out.output, agent.log());
    assert_pulled(&c3, &image).await?;
    assert!(agent.metric("shoal_bytes_served_total", &[]).await? > 0.0);
    Ok(())
}

#[tokio::test]
async fn multi_platform_indexes_and_docker_manifests_pull() -> Result<()> {
    let n = node().await?;
    let oci_index = Artifact::multi_platform(&[200_000, 30_000], 7, &["amd64", "arm64"])?;
    push(&oci_index, &n.registry.host(), "multi/oci", "v1", None, Format::Oci)?;
    let docker_list = Artifact::multi_platform(&[150_000], 8, &["amd64", "arm64"])?;
    let list_digest = push(&docker_list, &n.registry.host(), "multi/docker", "v1", None, Format::DockerV2S2)?;
    let docker_single = Artifact::Image(Image::random(&[120_000], 9, "amd64", Compression::Gzip)?);
    push(&docker_single, &n.registry.host(), "single/docker", "v1", None, Format::DockerV2S2)?;

    let http = reqwest::Client::new();
    let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
    let url = format!("{}/v2/multi/docker/manifests/v1?ns={}", n.agent.url(), n.proxy.host());
    let resp = http.get(&url).header("accept", accept).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/vnd.docker.distribution.manifest.list.v2+json");
    assert_eq!(resp.headers()["docker-content-digest"], list_digest.as_str());
    assert_eq!(sha256_digest(&resp.bytes().await?), list_digest);

    let c = containerd_for(&n).await?;
    for (reference, all) in [("multi/oci:v1", true), ("multi/docker:v1", true), ("single/docker:v1", false)] {
        let extra: &[&str] = if all { &["--all-platforms"] } else { &[] };
        let out = c.pull(&format!("{}/{reference}", n.proxy.host()), None, extra).await?;
        assert!(out.success, "{reference}: {}\n{}", out.output, n.agent.log());
    }
    assert_pulled(&c, &oci_index).await?;
    // Converted images have new manifest and config digests; their layers are the same bytes.
    for a in [&docker_list, &docker_single] {
        for b in a.all_blobs().iter().filter(|b| b.media_type.contains("layer")) {
            assert!(c.has_verified(&b.digest).await?, "missing layer {}", b.digest);
        }
    }
    assert_eq!(n.agent.metric("shoal_verify_failures_total", &[]).await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_4xx_json_from_the_real_process() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut n = node().await?;
    let digest = format!("sha256:{}", "c".repeat(64));
    let cases = [
        ("GET", "/v2/Bad/Name/manifests/latest".to_owned(), 400, "NAME_INVALID"),
        ("GET", "/v2/../../../etc/passwd/blobs/".to_owned() + &digest, 400, "NAME_INVALID"),
        ("GET", "/v2/a/%2e%2e/%2e%2e/blobs/".to_owned() + &digest, 400, "NAME_INVALID"),
        ("GET", "/v2/a/..%2f..%2fdata/blobs/".to_owned() + &digest, 400, "NAME_INVALID"),
        ("GET", "/v2/a/blobs/sha256:%2e%2e%2f%2e%2e".to_owned(), 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/sha256:1234".to_owned(), 400, "DIGEST_INVALID"),
        ("HEAD", "/v2/a/manifests/.hidden".to_owned(), 404, ""),
        ("PUT", "/v2/a/manifests/latest".to_owned(), 405, "UNSUPPORTED"),
        ("POST", "/v2/a/blobs/uploads/".to_owned(), 405, "UNSUPPORTED"),
        ("DELETE", "/v2/a/blobs/".to_owned() + &digest, 405, "UNSUPPORTED"),
        ("GET", format!("/v2/a/blobs/{digest}?ns=evil%2F..%2Fhost"), 400, "NAME_INVALID"),
        ("GET", format!("/v2/a/blobs/{digest}?ns={}", n.proxy.host()), 404, "BLOB_UNKNOWN"),
    ];
    for (method, path, status, code) in cases {
        let mut s = tokio::net::TcpStream::connect(n.agent.addr).await?;
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{method} {path}: {resp}");
        assert!(resp.contains(code), "{method} {path}: {resp}");
        if method != "HEAD" {
            assert!(resp.to_ascii_lowercase().contains("content-type: application/json"), "{method} {path}: {resp}");
        }
    }

    // Ranges on a cached blob: satisfiable, suffix, and the unsatisfiable and malformed ones.
    let image = Artifact::Image(Image::random(&[10_000], 10, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "r/x", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    let url = blob_url(&n, "r/x", &layer.digest);
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await?.bytes().await?.len(), layer.data.len());
    let resp = http.get(&url).header("range", "bytes=100-199").send().await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-range"], format!("bytes 100-199/{}", layer.data.len()).as_str());
    assert_eq!(resp.bytes().await?, layer.data[100..200]);
    for bad in ["bytes=999999-", "bytes=9-3"] {
        let resp = http.get(&url).header("range", bad).send().await?;
        assert_eq!(resp.status(), 416, "{bad}");
    }
    // A unit other than bytes, and several ranges, are ignored (RFC 9110): the whole blob.
    for ignored in ["pages=1-2", "bytes=0-1,5-9"] {
        let resp = http.get(&url).header("range", ignored).send().await?;
        assert_eq!(resp.status(), 200, "{ignored}");
        assert_eq!(resp.bytes().await?, layer.data, "{ignored}");
    }

    // Still alive and healthy, and SIGTERM ends it cleanly.
    assert_eq!(reqwest::get(format!("http://{}/healthz", n.agent.metrics_addr)).await?.status(), 200);
    assert!(n.agent.metric("shoal_http_requests_total", &["outcome=\"server_error\""]).await? == 0.0);
    let status = n.agent.terminate(Duration::from_secs(10)).await?;
    assert!(status.success(), "agent exited with {status}");
    Ok(())
}

#[tokio::test]
async fn gc_evicts_least_recently_used_but_never_a_blob_being_served() -> Result<()> {
    let n = node_with(Registry::start().await?, |b| {
        b.setting("disk_budget", "\"40MiB\"").setting("gc_high_watermark", "0.9").setting("gc_low_watermark", "0.5")
    })
    .await?;
    let image = Artifact::Image(Image::random(&[16 << 20, 16 << 20, 16 << 20], 11, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "gc/img", "v1", None, Format::Oci)?;
    let blobs = image.all_blobs();
    let (a, b, c) = (blobs[1].clone(), blobs[2].clone(), blobs[3].clone());
    let http = reqwest::Client::new();

    // `a` is cached, then held open by a client that reads a little and stalls.
    let body = http.get(blob_url(&n, "gc/img", &a.digest)).send().await?.bytes().await?;
    assert_eq!(sha256_digest(&body), a.digest);
    let resp = http.get(blob_url(&n, "gc/img", &a.digest)).send().await?;
    let mut held = resp.bytes_stream();
    let mut held_bytes = held.next().await.expect("a first chunk")?.to_vec();

    // `b` and `c` push the store over 90% of the budget: GC must evict down to 50%, and `a` is the least
    // recently used, but in use.
    for blob in [&b, &c] {
        let body = http.get(blob_url(&n, "gc/img", &blob.digest)).send().await?.bytes().await?;
        assert_eq!(sha256_digest(&body), blob.digest);
    }
    shoal_testbed::wait_for("a GC pass", Duration::from_secs(10), async || {
        n.agent.metric("shoal_gc_evicted_blobs_total", &[]).await.unwrap_or(0.0) >= 1.0
    })
    .await?;
    let path = |d: &str| n.agent.data_dir().join("blobs/sha256").join(&d[7..9]).join(&d[7..]);
    assert!(path(&a.digest).exists(), "the blob being served was evicted");
    // Blobs still being streamed when GC ran were kept too, so the store ends below the high watermark, not
    // necessarily the low one.
    assert!(n.agent.metric("shoal_store_bytes", &[]).await? <= (40 << 20) as f64 * 0.9);

    // The held response still completes with the right bytes.
    while let Some(chunk) = held.next().await {
        held_bytes.extend_from_slice(&chunk?);
    }
    assert_eq!(sha256_digest(&held_bytes), a.digest);

    // Whatever was evicted is fetched again on demand.
    for blob in [&a, &b, &c] {
        let body = http.get(blob_url(&n, "gc/img", &blob.digest)).send().await?.bytes().await?;
        assert_eq!(sha256_digest(&body), blob.digest);
    }
    Ok(())
}

#[tokio::test]
async fn bad_config_fails_before_binding_and_names_the_key() -> Result<()> {
    let port = shoal_testbed::free_port()?;
    let dir = tempfile::tempdir()?;
    let cases: [(&[&str], &str); 3] = [
        (&["--disk-budget", "12parsecs"], "disk_budget"),
        (&["--tag-ttl", "soon"], "tag_ttl"),
        (&["--registry", "r:5000=http://r:5000"], "plain_http"),
    ];
    for (args, key) in cases {
        let out = tokio::process::Command::new(shoal_testbed::shoal_bin()?)
            .arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(key), "{args:?}: {stderr}");
        assert!(!stderr.contains("backtrace"), "{args:?}: {stderr}");
        // Nothing was bound, nothing was created.
        std::net::TcpListener::bind(("127.0.0.1", port))?;
        assert!(!dir.path().join("data").exists());
    }
    Ok(())
}

#[tokio::test]
async fn a_stalled_upstream_ends_in_an_error_not_a_hang() -> Result<()> {
    let n = node_with(Registry::start().await?, |b| b.setting("upstream_stall_timeout", "\"500ms\"")).await?;
    let image = Artifact::Image(Image::random(&[1 << 20], 12, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "stall/img", "v1", None, Format::Oci)?;
    let layer = image.all_blobs()[1].clone();
    // Headers come at once, then the body never moves.
    n.proxy.set_fault(Fault::Throttle(1));
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        let resp = reqwest::get(blob_url(&n, "stall/img", &layer.digest)).await?;
        let status = resp.status();
        Ok::<_, reqwest::Error>((status, resp.bytes().await))
    })
    .await
    .expect("the client hung on a stalled upstream")?;
    // Either an error status (nothing arrived before the download failed) or a body cut short.
    let delivered = matches!(&outcome, (s, Ok(b)) if s.is_success() && b.len() == layer.data.len());
    assert!(!delivered, "a stalled download was delivered whole");
    // Every resume attempt stalled too; the agent gave up after a bounded number of them.
    assert!(n.proxy.count("GET", &format!("/blobs/{}", layer.digest)) >= 2);
    assert!(n.agent.log().contains("download failed"), "{}", n.agent.log());
    eprintln!("stalled download failed after {:?}", started.elapsed());
    Ok(())
}

/// The agent's resident memory, in MiB.
fn rss_mib(agent: &Agent) -> f64 {
    let pid = agent.pid().expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's /proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kib / 1024.0
}

/// Reads until the server closes the connection or `within` passes; returns the bytes read and whether it closed.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> (usize, bool) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
            Err(_) => return (total, false),
        }
    }
}

#[tokio::test]
async fn stalled_clients_cost_bounded_memory_and_are_dropped() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let n = node_with(Registry::start().await?, |b| {
        b.setting("client_header_timeout", "\"2s\"").setting("client_stall_timeout", "\"3s\"")
    })
    .await?;
    let image = Artifact::Image(Image::random(&[16 << 20], 7, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "big/app", "v1", None, Format::Oci)?;
    let big = image.all_blobs().into_iter().max_by_key(|b| b.data.len()).expect("the layer");
    let (layer, size) = (big.digest.clone(), big.data.len());
    let http = reqwest::Client::new();
    let url = blob_url(&n, "big/app", &layer);
    assert_eq!(http.get(&url).send().await?.bytes().await?.len(), size, "the layer is cached");
    let baseline = rss_mib(&n.agent);

    // 1,000 connections that send half a request head and stop.
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(n.agent.addr).await?;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ").await?;
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_stalled = rss_mib(&n.agent) - baseline;
    // Each is closed once the header deadline passes.
    let closed =
        futures_util::future::join_all(stalled.iter_mut().map(|s| read_until_closed(s, Duration::from_secs(6))))
            .await
            .into_iter()
            .filter(|(_, closed)| *closed)
            .count();
    assert_eq!(closed, 1000, "stalled connections still open after the header timeout");
    drop(stalled);
    assert!(with_stalled < 64.0, "1,000 stalled connections cost {with_stalled:.0} MiB");

    // 150 clients ask for the 16 MiB layer and read nothing: what their responses hold stays within the budget.
    let path = format!("/v2/big/app/blobs/{layer}?ns={}", n.proxy.host());
    let mut unread = Vec::new();
    for _ in 0..150 {
        let mut s = tokio::net::TcpStream::connect(n.agent.addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
        unread.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_unread = rss_mib(&n.agent) - baseline;
    // Meanwhile a client that reads gets the whole layer.
    let got = tokio::time::timeout(Duration::from_secs(20), async { http.get(&url).send().await?.bytes().await })
        .await
        .map_err(|_| anyhow::anyhow!("a reading client was starved by the stalled ones"))??;
    assert_eq!(got.len(), size);
    // The stalled responses are cut off after the stall timeout: each client then finds its connection closed
    // before the whole layer arrived.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let results =
        futures_util::future::join_all(unread.iter_mut().map(|s| read_until_closed(s, Duration::from_secs(10)))).await;
    let cut = results.iter().filter(|(read, closed)| *closed && *read < size).count();
    assert_eq!(cut, 150, "unread responses not dropped: {results:?}");
    assert!(with_unread < 64.0 + 48.0, "150 unread 16 MiB responses cost {with_unread:.0} MiB");
    println!(
        "RSS over a {baseline:.0} MiB baseline: 1,000 stalled heads {with_stalled:.1} MiB, 150 unread responses {with_unread:.1} MiB"
    );
    Ok(())
}

/// An HTTPS "registry" on loopback that answers 200 to every request, whatever the credentials: the swapped
/// registry of the audit. Its certificate is written to `ca`, for the agent to trust (`SSL_CERT_FILE`).
async fn yes_registry(
    ca: &std::path::Path,
) -> Result<(std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, cert.cert.der());
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
    std::fs::write(ca, format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n")))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let tls =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert.cert.der().clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, counter) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async {
                        let mut r = http::Response::new(String::from("{}"));
                        r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((addr, asked))
}

#[tokio::test]
async fn a_swapped_registry_unlocks_no_private_content() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.pem");
    let (yes, asked) = yes_registry(&ca).await?;
    let n = node_with(Registry::start_private("alice", "wonderland").await?, |b| {
        b.env("SSL_CERT_FILE", ca.to_str().expect("a UTF-8 path"))
    })
    .await?;
    let image = Artifact::Image(Image::random(&[300_000], 9, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "private/app", "v1", n.registry.creds_arg().as_deref(), Format::Oci)?;
    let layer = image.all_blobs().into_iter().max_by_key(|b| b.data.len()).expect("a layer").clone();
    let http = reqwest::Client::builder().no_proxy().build()?;
    // Alice pulls the private layer through the agent: it is cached, as private content of that registry.
    let alice = "Basic YWxpY2U6d29uZGVybGFuZA==";
    let got = http.get(blob_url(&n, "private/app", &layer.digest)).header("authorization", alice).send().await?;
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await?.len(), layer.data.len());
    // Another pod names a registry that says yes to anything: with no credentials, with made-up ones.
    for auth in [None, Some("Basic bWFsbG9yeTp4")] {
        let url = format!("{}/v2/any/thing/blobs/{}?ns={yes}", n.agent.url(), layer.digest);
        let mut req = http.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        assert!(body != layer.data, "the private layer leaked through a swapped registry ({status}, auth {auth:?})");
        assert_ne!(status, 200, "auth {auth:?}");
    }
    // And by digest under alice's repository name, but the swapped registry: the same.
    let url = format!("{}/v2/private/app/blobs/{}?ns={yes}", n.agent.url(), layer.digest);
    let resp = http.get(&url).send().await?;
    assert_ne!(resp.status(), 200);
    println!("the yes-registry was asked {} times", asked.load(std::sync::atomic::Ordering::SeqCst));
    Ok(())
}

/// What containerd 2.x sends (with `concurrent_layer_fetch_buffer` set): the tag's HEAD, then the manifest by digest
/// with `Range: bytes=0-`, then parallel open-ended ranges of one layer, every GET with
/// `Accept-Encoding: zstd, gzip, deflate`. Against a cold agent (the ranges join one download) and a warm one.
#[tokio::test]
async fn containerd_2_requests_cold_and_warm() -> Result<()> {
    let n = node().await?;
    let image = Artifact::Image(Image::random(&[6 << 20], 12, "amd64", Compression::None)?);
    push(&image, &n.registry.host(), "two/x", "v1", None, Format::Oci)?;
    n.proxy.reset_counts();
    let layer = image.all_blobs().into_iter().max_by_key(|b| b.data.len()).expect("a layer").clone();
    let manifest = image.top().clone();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let enc = ("accept-encoding", "zstd, gzip, deflate");
    let base = format!("{}/v2/two/x", n.agent.url());
    let ns = n.proxy.host();
    // Upstream crawls at first, so the cold ranges all join the download while it runs.
    n.proxy.set_fault(Fault::Throttle(4 << 20));
    for round in ["cold", "warm"] {
        let head = http
            .head(format!("{base}/manifests/v1?ns={ns}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await?;
        assert_eq!(head.status(), 200, "{round}");
        assert_eq!(head.headers()["docker-content-digest"], manifest.digest.as_str(), "{round}");
        let got = http
            .get(format!("{base}/manifests/{}?ns={ns}", manifest.digest))
            .header("range", "bytes=0-")
            .header(enc.0, enc.1)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await?;
        assert!(got.status() == 200 || got.status() == 206, "{round}: manifest with bytes=0- got {}", got.status());
        assert!(got.headers().get("content-encoding").is_none(), "{round}: a manifest was encoded");
        assert_eq!(got.bytes().await?, manifest.data, "{round}: the manifest's bytes");
        let size = layer.data.len();
        let starts = [0, size / 4, size / 2, 3 * size / 4];
        let ranges = starts.map(|start| {
            let (http, url) = (http.clone(), format!("{base}/blobs/{}?ns={ns}", layer.digest));
            async move {
                let resp = http.get(url).header("range", format!("bytes={start}-")).header(enc.0, enc.1).send().await?;
                anyhow::ensure!(resp.status() == 206, "status {}", resp.status());
                anyhow::ensure!(resp.headers().get("content-encoding").is_none(), "a layer was encoded");
                let want = format!("bytes {start}-{}/{size}", size - 1);
                anyhow::ensure!(resp.headers()["content-range"] == want.as_str(), "content-range");
                Ok::<_, anyhow::Error>((start, resp.bytes().await?))
            }
        });
        for r in futures_util::future::join_all(ranges).await {
            let (start, body) = r?;
            assert!(body == layer.data[start..], "{round}: range from {start}");
        }
        n.proxy.set_fault(Fault::None);
    }
    assert_eq!(n.proxy.count("GET", &format!("/blobs/{}", layer.digest)), 1, "one download for every range");
    assert_eq!(n.proxy.count("GET", &format!("/manifests/{}", manifest.digest)), 1);
    Ok(())
}

/// The OCI distribution spec's pull side, every MUST (v1.0/v1.1 "Pull" category), against the agent cold and warm:
/// `GET /v2/` answers 200; a manifest by tag and by digest, and a blob, answer 200 to GET (the exact bytes) and
/// HEAD (no body), and a `Docker-Content-Digest` present names the body's digest; what does not exist is 404;
/// names and references outside the spec's grammar are refused; every 4xx with a JSON body has the spec's shape and
/// one of its codes. Warm, upstream is not asked again for anything addressed by digest.
#[tokio::test]
async fn distribution_spec_pull_musts_cold_and_warm() -> Result<()> {
    use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
    const CODES: [&str; 14] = [
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    ];
    let n = node().await?;
    let image = Image::random(&[200_000, 3_000], 21, "amd64", Compression::Gzip)?;
    let manifest = image.manifest.clone();
    let blobs: Vec<_> = std::iter::once(image.config.clone()).chain(image.layers.iter().cloned()).collect();
    push(&Artifact::Image(image), &n.registry.host(), "spec/app", "v1.0", None, Format::Oci)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
    let ns = n.proxy.host();
    let url = |path: &str| format!("{}{path}?ns={ns}", n.agent.url());

    // A 4xx: the status, and a JSON body (when there is one) in the spec's shape with one of its codes.
    let refused = |status: u16, body: &[u8], what: &str| -> Result<Vec<String>> {
        anyhow::ensure!((400..500).contains(&status), "{what}: status {status}");
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| anyhow::anyhow!("{what}: not JSON: {e}"))?;
        let errors = v["errors"].as_array().ok_or_else(|| anyhow::anyhow!("{what}: no errors array: {v}"))?;
        anyhow::ensure!(!errors.is_empty(), "{what}: empty errors");
        let mut codes = Vec::new();
        for e in errors {
            let code = e["code"].as_str().unwrap_or_default();
            anyhow::ensure!(CODES.contains(&code), "{what}: code {code:?} is not one of the spec's");
            anyhow::ensure!(e.get("message").is_none_or(serde_json::Value::is_string), "{what}: message");
            codes.push(code.to_owned());
        }
        Ok(codes)
    };

    for round in ["cold", "warm"] {
        let v2 = http.get(format!("{}/v2/", n.agent.url())).send().await?;
        assert_eq!(v2.status(), 200, "{round}: GET /v2/");

        // Manifests by tag and by digest.
        for reference in ["v1.0", manifest.digest.as_str()] {
            let path = format!("/v2/spec/app/manifests/{reference}");
            let head = http.head(url(&path)).header(ACCEPT, accept).send().await?;
            assert_eq!(head.status(), 200, "{round}: HEAD {path}");
            assert_eq!(head.headers()[CONTENT_LENGTH], manifest.data.len().to_string().as_str(), "{round}: {path}");
            assert_eq!(head.headers()["docker-content-digest"], manifest.digest.as_str(), "{round}: HEAD {path}");
            let get = http.get(url(&path)).header(ACCEPT, accept).send().await?;
            assert_eq!(get.status(), 200, "{round}: GET {path}");
            assert_eq!(
                get.headers()[CONTENT_TYPE],
                "application/vnd.oci.image.manifest.v1+json",
                "{round}: the manifest's media type"
            );
            let digest = get.headers().get("docker-content-digest").cloned();
            let body = get.bytes().await?;
            assert_eq!(body.as_ref(), manifest.data.as_slice(), "{round}: GET {path}");
            if let Some(d) = digest {
                assert_eq!(d.to_str()?, sha256_digest(&body), "{round}: the digest header names the body");
            }
        }
        // Blobs.
        for blob in &blobs {
            let path = format!("/v2/spec/app/blobs/{}", blob.digest);
            let head = http.head(url(&path)).send().await?;
            assert_eq!(head.status(), 200, "{round}: HEAD {path}");
            assert_eq!(head.headers()[CONTENT_LENGTH], blob.data.len().to_string().as_str(), "{round}: {path}");
            let get = http.get(url(&path)).send().await?;
            assert_eq!(get.status(), 200, "{round}: GET {path}");
            let digest = get.headers().get("docker-content-digest").cloned();
            let body = get.bytes().await?;
            assert!(body.as_ref() == blob.data.as_slice(), "{round}: GET {path}: the blob's bytes");
            if let Some(d) = digest {
                assert_eq!(d.to_str()?, sha256_digest(&body), "{round}: the digest header names the body");
            }
        }

        // What does not exist: 404. Outside the grammar — names (components `[a-z0-9]+([._-][a-z0-9]+)*`, under 256
        // characters in all), digests (`algorithm:hex`): 400. A tag outside `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}` names
        // no manifest: 404 `MANIFEST_UNKNOWN` (the spec has no code for it). GET has the spec's body; HEAD the status.
        let nothing = format!("sha256:{}", "0".repeat(64));
        let long_name = vec!["a".repeat(50); 6].join("/");
        let long_tag = "t".repeat(129);
        // A repository upstream does not know may be reported either way (upstream's answer is passed on).
        let no_repo: &[&str] = &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"];
        let refusals: Vec<(String, u16, &[&str])> = vec![
            ("/v2/spec/app/manifests/no-such-tag".into(), 404, &["MANIFEST_UNKNOWN"]),
            (format!("/v2/spec/app/manifests/{nothing}"), 404, &["MANIFEST_UNKNOWN"]),
            (format!("/v2/spec/app/blobs/{nothing}"), 404, &["BLOB_UNKNOWN"]),
            ("/v2/spec/no-such-repo/manifests/v1.0".into(), 404, no_repo),
            ("/v2/Spec/app/manifests/v1.0".into(), 400, &["NAME_INVALID"]),
            ("/v2/spec//app/manifests/v1.0".into(), 400, &["NAME_INVALID"]),
            ("/v2/-spec/app/manifests/v1.0".into(), 400, &["NAME_INVALID"]),
            ("/v2/spec/app./manifests/v1.0".into(), 400, &["NAME_INVALID"]),
            (format!("/v2/{long_name}/manifests/v1.0"), 400, &["NAME_INVALID"]),
            ("/v2/spec/app/manifests/sha256:xyz".into(), 400, &["DIGEST_INVALID"]),
            ("/v2/spec/app/blobs/sha256:1234".into(), 400, &["DIGEST_INVALID"]),
            ("/v2/spec/app/blobs/v1.0".into(), 400, &["DIGEST_INVALID"]),
            ("/v2/spec/app/manifests/.hidden".into(), 404, &["MANIFEST_UNKNOWN"]),
            (format!("/v2/spec/app/manifests/{long_tag}"), 404, &["MANIFEST_UNKNOWN"]),
        ];
        for (path, want, expected) in &refusals {
            let get = http.get(url(path)).header(ACCEPT, accept).send().await?;
            let status = get.status().as_u16();
            let codes = refused(status, &get.bytes().await?, &format!("{round}: GET {path}"))?;
            assert_eq!(status, *want, "{round}: GET {path}");
            assert!(codes.iter().any(|c| expected.contains(&c.as_str())), "{round}: GET {path}: {codes:?}");
            let head = http.head(url(path)).header(ACCEPT, accept).send().await?;
            assert_eq!(head.status().as_u16(), *want, "{round}: HEAD {path}");
        }
        // The longest name the spec allows is a name.
        let longest = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        let get = http.get(url(&format!("/v2/{longest}/manifests/v1.0"))).send().await?;
        assert_eq!(get.status(), 404, "{round}: a 255-character name is valid (and unknown)");
    }
    assert_eq!(n.proxy.count("GET", &format!("/manifests/{}", manifest.digest)), 1, "warm: by digest, from the store");
    for blob in &blobs {
        assert_eq!(n.proxy.count("GET", &format!("/blobs/{}", blob.digest)), 1, "warm: {}", blob.digest);
    }
    Ok(())
}
