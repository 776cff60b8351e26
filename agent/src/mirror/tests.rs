//! The HTTP surface in-process: parsing, errors and ranges, with an upstream that cannot be reached.

use super::*;
use crate::config::RawConfig;
use crate::store::{BlobMeta, LinkRecord, Store, now_secs};
use crate::upstream::Upstream;
use axum::body::to_bytes;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    store: Arc<Store>,
    resolver: Arc<Resolver>,
}

fn fixture() -> Fixture {
    // Nothing listens on port 1: every upstream request fails at once.
    fixture_with(
        "upstream_attempts = 1\nupstream_connect_timeout = \"200ms\"\ndefault_registry = \"127.0.0.1:1\"\n\
         [registry.\"127.0.0.1:1\"]\nplain_http = true\n",
    )
}

fn fixture_with(toml: &str) -> Fixture {
    fixture_abandoning(toml, crate::resolver::ABANDON_AFTER)
}

fn fixture_abandoning(toml: &str, abandon_after: std::time::Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawConfig::from_toml(toml).unwrap();
    let cfg = raw.validate().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let store = Arc::new(store);
    let metrics = Metrics::default();
    let upstream = Arc::new(Upstream::new(cfg.upstream.clone(), metrics.upstream.clone()).unwrap());
    let resolver = Resolver::new(
        store.clone(),
        upstream,
        crate::resolver::ResolverConfig {
            tag_ttl: cfg.tag_ttl,
            auth_ttl: cfg.auth_ttl,
            gc_high_bytes: cfg.gc_high_bytes,
            min_free_space: cfg.min_free_space,
            gc_low_bytes: cfg.gc_low_bytes,
            abandon_after,
        },
        metrics.clone(),
        TaskTracker::new(),
        CancellationToken::new(),
        crate::resolver::Others::default(),
    );
    Fixture { _dir: dir, app: router(MirrorState { resolver: resolver.clone(), metrics }), store, resolver }
}

/// Stores a blob as if downloaded for `repo`, publicly or with a client's credentials.
fn put_blob(f: &Fixture, repo: &str, data: &[u8], public: bool) -> Digest {
    let d = Digest::from_sha256(&Sha256::digest(data));
    let (path, mut file) = f.store.create_partial(&d).unwrap();
    crate::store::write_all(&mut file, data, &path).unwrap();
    let registry = (!public).then(|| RegistryHost::parse("127.0.0.1:1").unwrap());
    let meta = BlobMeta { size: data.len() as u64, media_type: None, last_access: now_secs(), public, registry };
    f.store.commit(&path, &file, &d, &meta, None).unwrap();
    f.store.put_link(&format!("127.0.0.1:1/{repo}@{d}"), LinkRecord { public, at: now_secs() }).unwrap();
    d
}

async fn call(app: &Router, method: &str, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = app.clone().oneshot(b.body(Body::empty()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = to_bytes(body, usize::MAX).await.unwrap().to_vec();
    (parts.status, parts.headers, body)
}

fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("error bodies are JSON");
    v["errors"][0]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn base_endpoint() {
    let f = fixture();
    let (s, h, _) = call(&f.app, "GET", "/v2/", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");
    assert_eq!(call(&f.app, "HEAD", "/v2", &[]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_gets_4xx_json() {
    let f = fixture();
    let digest = format!("sha256:{}", "a".repeat(64));
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("/v2/UPPER/manifests/latest".into(), StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a/../../etc/manifests/latest".into(), StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/blobs/".to_owned() + &digest, StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a%2f..%2fb/blobs/".to_owned() + &digest, StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2//a/blobs/".to_owned() + &digest, StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:xyz".into(), StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:../../../etc/passwd".into(), StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/blobs/latest".into(), StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/manifests/-bad".into(), StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        ("/v2/a/manifests/sha256:zz".into(), StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        (format!("/v2/a/blobs/{digest}?ns=bad%2Fhost"), StatusCode::BAD_REQUEST, "NAME_INVALID"),
        (format!("/v2/a/blobs/{digest}?ns=%zz"), StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/_catalog".into(), StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        ("/v2/a/tags/list".into(), StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        ("/etc/passwd".into(), StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
    ];
    for (uri, status, want) in cases {
        let (s, h, body) = call(&f.app, "GET", &uri, &[]).await;
        assert_eq!(s, status, "{uri}");
        assert_eq!(h[header::CONTENT_TYPE], "application/json", "{uri}");
        assert_eq!(code(&body), want, "{uri}");
    }
}

#[tokio::test]
async fn writes_are_refused() {
    let f = fixture();
    for (m, uri) in [
        ("POST", "/v2/a/blobs/uploads/"),
        ("PUT", "/v2/a/manifests/latest"),
        ("DELETE", "/v2/a/manifests/latest"),
        ("PATCH", "/v2/a/blobs/uploads/x"),
        ("GET", "/v2/a/blobs/uploads/x"),
    ] {
        let (s, _, body) = call(&f.app, m, uri, &[]).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
        assert_eq!(code(&body), "UNSUPPORTED");
    }
}

#[tokio::test]
async fn miss_with_upstream_down_is_a_fast_404() {
    let f = fixture();
    let digest = format!("sha256:{}", "b".repeat(64));
    let (s, _, body) = call(&f.app, "GET", &format!("/v2/a/blobs/{digest}"), &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(code(&body), "BLOB_UNKNOWN");
    let (s, _, body) = call(&f.app, "HEAD", "/v2/a/manifests/latest?ns=127.0.0.1%3A1", &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body.is_empty() || code(&body) == "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn cached_blob_ranges() {
    let f = fixture();
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let d = put_blob(&f, "lib/x", &data, true);
    let uri = format!("/v2/lib/x/blobs/{d}?ns=127.0.0.1:1");
    let (s, h, body) = call(&f.app, "GET", &uri, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, data);
    assert_eq!(h["docker-content-digest"], d.as_str());
    assert_eq!(h[header::CONTENT_LENGTH], "1000");

    let (s, h, body) = call(&f.app, "HEAD", &uri, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::CONTENT_LENGTH], "1000");
    assert!(body.is_empty());

    let (s, h, body) = call(&f.app, "GET", &uri, &[("range", "bytes=10-19")]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h[header::CONTENT_RANGE], "bytes 10-19/1000");
    assert_eq!(body, &data[10..20]);

    let (s, _, body) = call(&f.app, "GET", &uri, &[("range", "bytes=-5")]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, &data[995..]);

    for bad in ["bytes=1000-", "bytes=5-1"] {
        let (s, h, body) = call(&f.app, "GET", &uri, &[("range", bad)]).await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(h[header::CONTENT_RANGE], "bytes */1000");
        assert_eq!(code(&body), "UNSUPPORTED");
    }
    // Another unit, or several ranges: the header is ignored (RFC 9110), the whole blob sent.
    for ignored in ["lines=1-2", "bytes=0-1,4-5"] {
        let (s, _, body) = call(&f.app, "GET", &uri, &[("range", ignored)]).await;
        assert_eq!(s, StatusCode::OK, "{ignored}");
        assert_eq!(body, data, "{ignored}");
    }
}

#[tokio::test]
async fn private_content_is_not_served_without_upstream_consent() {
    let f = fixture();
    let data = b"secret layer";
    let d = put_blob(&f, "private/x", data, false);
    // Upstream cannot confirm anyone: neither an anonymous client nor one with unknown credentials gets it.
    for auth in [None, Some("Basic Zm9vOmJhcg==")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (s, _, body) = call(&f.app, "GET", &format!("/v2/private/x/blobs/{d}"), &headers).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_ne!(body, data);
    }
}

/// A request whose store lookup missed a private blob that was committed right after (a client's download
/// finishing) starts a download that finds the blob stored: the access check still applies (it did not: a made-up
/// credential naming a swapped registry was given a private layer once in CI).
#[tokio::test]
async fn private_content_committed_after_a_lookup_is_still_checked() {
    let f = fixture();
    let data = b"secret layer";
    let d = put_blob(&f, "private/x", data, false);
    for (registry, auth) in [("127.0.0.1:1", None), ("127.0.0.1:1", Some("Basic Zm9vOmJhcg==")), ("evil.example", None)]
    {
        let client = Client {
            registry: RegistryHost::parse(registry).unwrap(),
            repo: RepoName::parse("private/x").unwrap(),
            auth: auth.map(HeaderValue::from_static),
            accept: None,
        };
        let got = f.resolver.open_after_a_missed_lookup(&client, &d).await;
        assert!(got.is_err(), "{registry} with {auth:?} was given the private blob");
    }
    // Public content is anyone's on this path too.
    let public = put_blob(&f, "public/x", b"public layer", true);
    let client = Client {
        registry: RegistryHost::parse("evil.example").unwrap(),
        repo: RepoName::parse("any/thing").unwrap(),
        auth: None,
        accept: None,
    };
    f.resolver.open_after_a_missed_lookup(&client, &public).await.expect("public content");
}

#[tokio::test]
async fn a_body_of_unannounced_length_stops_at_the_cache_budget() {
    // An upstream that answers every blob with a body that never ends and says no length.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    let endless = Router::new().fallback(|| async {
        let chunk = bytes::Bytes::from(vec![7u8; 64 << 10]);
        Body::from_stream(futures_util::stream::repeat(chunk).map(Ok::<_, std::convert::Infallible>))
    });
    tokio::spawn(async move { axum::serve(l, endless).await.unwrap() });
    let f = fixture_with(&format!(
        "disk_budget = \"4MiB\"\nmin_free_space = \"0\"\ndefault_registry = \"{upstream}\"\n\
         [registry.\"{upstream}\"]\nplain_http = true\n"
    ));
    let digest = format!("sha256:{}", "e".repeat(64));
    let req = http::Request::get(format!("/v2/a/blobs/{digest}")).body(Body::empty()).unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the download started");
    let mut body = resp.into_body().into_data_stream();
    let mut read = 0usize;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => read += c.len(),
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .expect("the download went on past the budget");
    assert!(ended, "the response must end in an error, not look complete");
    assert!(read <= 4 << 20, "{read} bytes streamed past a 4 MiB budget");
    // Nothing was kept: the partial file goes (once the failed download has cleaned up) and the store is empty.
    assert!(
        eventually(std::time::Duration::from_secs(5), || partials(&f) == 0).await,
        "a partial file was left behind"
    );
    assert_eq!(f.store.bytes(), 0);
}

#[tokio::test]
async fn a_download_nobody_wants_is_abandoned() {
    // An upstream that sends a body of unannounced length slowly, for ever, counting what it sent.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    let counter = sent.clone();
    let slow = Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            let chunks = futures_util::stream::unfold(counter, |c| async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                c.fetch_add(16 << 10, std::sync::atomic::Ordering::SeqCst);
                Some((Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![1u8; 16 << 10])), c))
            });
            Body::from_stream(chunks)
        }
    });
    tokio::spawn(async move { axum::serve(l, slow).await.unwrap() });
    let f = fixture_abandoning(
        &format!("default_registry = \"{upstream}\"\n[registry.\"{upstream}\"]\nplain_http = true\n"),
        std::time::Duration::from_secs(1),
    );
    let digest = format!("sha256:{}", "f".repeat(64));
    let req = http::Request::get(format!("/v2/a/blobs/{digest}")).body(Body::empty()).unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The client reads a little and leaves.
    let mut body = resp.into_body().into_data_stream();
    let _ = body.next().await;
    drop(body);
    // Within the abandon time and a little, the download ends and its file goes; upstream is asked for no more.
    let gone = eventually(std::time::Duration::from_secs(5), || partials(&f) == 0).await;
    assert!(gone, "the abandoned download's partial file was left behind");
    let at = sent.load(std::sync::atomic::Ordering::SeqCst);
    // A few of the upstream's chunk intervals (50 ms): a download still running would have taken more.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), at, "the download went on for nobody");
}

/// Partial files in the fixture's store.
fn partials(f: &Fixture) -> usize {
    std::fs::read_dir(f._dir.path().join("partial")).map(|d| d.count()).unwrap_or(0)
}

/// Whether `cond` holds within `within` (checked every 20 ms).
async fn eventually(within: std::time::Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}
