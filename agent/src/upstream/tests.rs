//! The upstream client against an in-process fake registry on port 0: the Bearer token flow, token caching,
//! redirects to another origin without credentials, retries on 5xx and challenge pass-through.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Request as HttpRequest, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::*;
use crate::config::RawConfig;

#[derive(Default)]
struct Seen {
    token_calls: AtomicUsize,
    token_with_creds: AtomicUsize,
    blob_calls: AtomicUsize,
    storage_calls: AtomicUsize,
    storage_saw_auth: AtomicUsize,
    flaky_left: AtomicUsize,
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

/// A registry with token auth whose blobs redirect to a separate "object storage" origin.
async fn fake_registry(seen: Arc<Seen>) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let storage = serve(
        Router::new()
            .fallback(|State(s): State<Arc<Seen>>, req: HttpRequest| async move {
                s.storage_calls.fetch_add(1, Ordering::SeqCst);
                if req.headers().contains_key(header::AUTHORIZATION) {
                    s.storage_saw_auth.fetch_add(1, Ordering::SeqCst);
                }
                "blob bytes".into_response()
            })
            .with_state(seen.clone()),
    )
    .await;
    let registry_port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = registry_port.local_addr().unwrap();
    let app = Router::new()
        .fallback(move |State(s): State<Arc<Seen>>, req: HttpRequest| async move {
            let path = req.uri().path().to_owned();
            if path == "/token" {
                s.token_calls.fetch_add(1, Ordering::SeqCst);
                let q = req.uri().query().unwrap_or_default().to_owned();
                assert!(q.contains("service=fake") && q.contains("scope=repository%3Alib%2Fapp%3Apull"), "{q}");
                if req.headers().get(header::AUTHORIZATION).is_some_and(|v| v.as_bytes().starts_with(b"Basic ")) {
                    s.token_with_creds.fetch_add(1, Ordering::SeqCst);
                }
                return (StatusCode::OK, r#"{"token":"tok-1","expires_in":300}"#).into_response();
            }
            if path.ends_with("/flaky") && s.flaky_left.load(Ordering::SeqCst) > 0 {
                s.flaky_left.fetch_sub(1, Ordering::SeqCst);
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            if req.headers().get(header::AUTHORIZATION) != Some(&HeaderValue::from_static("Bearer tok-1")) {
                let challenge =
                    format!(r#"Bearer realm="http://{addr}/token",service="fake",scope="repository:lib/app:pull""#);
                let mut r: Response = StatusCode::UNAUTHORIZED.into_response();
                r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge.parse().unwrap());
                return r;
            }
            s.blob_calls.fetch_add(1, Ordering::SeqCst);
            let mut r: Response = StatusCode::TEMPORARY_REDIRECT.into_response();
            r.headers_mut().insert(header::LOCATION, format!("http://{storage}/bucket{path}").parse().unwrap());
            r
        })
        .with_state(seen);
    tokio::spawn(async move { axum::serve(registry_port, app).await.unwrap() });
    (addr, storage)
}

fn client(addr: std::net::SocketAddr, creds: Option<&std::path::Path>) -> Upstream {
    let mut toml = format!("upstream_attempts = 3\n[registry.\"{addr}\"]\nplain_http = true\n");
    if let Some(p) = creds {
        toml.push_str(&format!("credentials_file = \"{}\"\n", p.display()));
    }
    let cfg = RawConfig::from_toml(&toml).unwrap().validate().unwrap();
    Upstream::new(cfg.upstream, UpstreamMetrics::default()).unwrap()
}

fn request<'a>(
    host: &'a RegistryHost,
    repo: &'a RepoName,
    target: Target<'a>,
    head: bool,
    client_auth: Option<&'a HeaderValue>,
) -> Request<'a> {
    Request { registry: host, repo, target, head, accept: None, client_auth, offset: 0, end: None }
}

fn digest() -> Digest {
    Digest::parse(&format!("sha256:{}", "d".repeat(64))).unwrap()
}

#[tokio::test]
async fn token_flow_cached_and_redirects_carry_no_credentials() {
    let seen = Arc::new(Seen::default());
    let (addr, _) = fake_registry(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "bot:pw").unwrap();
    let up = client(addr, Some(&creds));
    let host = RegistryHost::parse(&addr.to_string()).unwrap();
    let repo = RepoName::parse("lib/app").unwrap();
    let d = digest();
    for _ in 0..3 {
        let req = request(&host, &repo, Target::Blob(&d), false, None);
        let resp = up.send(req).await.unwrap();
        assert_eq!(resp.bytes().await.unwrap(), "blob bytes");
    }
    assert_eq!(seen.token_calls.load(Ordering::SeqCst), 1, "the token is cached per repository");
    assert_eq!(seen.token_with_creds.load(Ordering::SeqCst), 1, "configured credentials go to the realm");
    assert_eq!(seen.blob_calls.load(Ordering::SeqCst), 3);
    assert_eq!(seen.storage_calls.load(Ordering::SeqCst), 3);
    assert_eq!(seen.storage_saw_auth.load(Ordering::SeqCst), 0, "credentials leaked to the redirect target");
}

#[tokio::test]
async fn a_clients_rejected_credentials_get_the_challenge_back() {
    let seen = Arc::new(Seen::default());
    let (addr, _) = fake_registry(seen.clone()).await;
    let up = client(addr, None);
    let host = RegistryHost::parse(&addr.to_string()).unwrap();
    let repo = RepoName::parse("lib/app").unwrap();
    let d = digest();
    let bad = HeaderValue::from_static("Bearer not-a-token");
    let req = request(&host, &repo, Target::Blob(&d), true, Some(&bad));
    match up.send(req).await {
        Err(UpstreamError::Unauthorized { challenge: Some(c) }) => {
            assert!(c.to_str().unwrap().starts_with("Bearer realm="));
        }
        other => panic!("expected the challenge, got {other:?}"),
    }
    // The agent never fetches a token on a client's behalf when the client brought its own credentials.
    assert_eq!(seen.token_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let seen = Arc::new(Seen::default());
    seen.flaky_left.store(2, Ordering::SeqCst);
    let (addr, _) = fake_registry(seen.clone()).await;
    let up = client(addr, None);
    let host = RegistryHost::parse(&addr.to_string()).unwrap();
    let repo = RepoName::parse("lib/app").unwrap();
    let flaky = Reference::Tag("flaky".into());
    let req = request(&host, &repo, Target::Manifest(&flaky), true, None);
    // Two 503s, then the auth dance, then the (redirected) answer: within three attempts.
    assert!(up.send(req).await.is_ok());
    seen.flaky_left.store(10, Ordering::SeqCst);
    match up.send(req).await {
        Err(UpstreamError::Unreachable(msg)) => assert!(msg.contains("503"), "{msg}"),
        other => panic!("expected unreachable after retries, got {other:?}"),
    }
    // It answered (with errors): not down, asked again at once.
    seen.flaky_left.store(0, Ordering::SeqCst);
    assert!(up.send(req).await.is_ok());
}

#[tokio::test]
async fn unlisted_registries_can_be_refused() {
    let cfg = RawConfig::from_toml("allow_unlisted_registries = false").unwrap().validate().unwrap();
    let up = Upstream::new(cfg.upstream, UpstreamMetrics::default()).unwrap();
    let host = RegistryHost::parse("evil.example:444").unwrap();
    let repo = RepoName::parse("x").unwrap();
    let d = digest();
    let req = request(&host, &repo, Target::Blob(&d), true, None);
    assert!(matches!(up.send(req).await, Err(UpstreamError::NotAllowed(_))));
}

#[tokio::test]
async fn a_registry_that_cannot_be_reached_is_not_asked_again_until_a_probe_answers() {
    // Closes connections at once while `broken` (every attempt a transport error), then answers 200 to anything.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted, broken) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::atomic::AtomicBool::new(true)));
    let (count, is_broken) = (accepted.clone(), broken.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if !is_broken.load(Ordering::SeqCst) {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                });
            }
        }
    });
    let up = client(addr, None);
    let host = RegistryHost::parse(&addr.to_string()).unwrap();
    let repo = RepoName::parse("lib/app").unwrap();
    let d = digest();
    let req = request(&host, &repo, Target::Blob(&d), false, None);
    assert!(matches!(up.send(req).await, Err(UpstreamError::Unreachable(_))));
    let tried = accepted.load(Ordering::SeqCst);
    assert!(tried >= 3, "every attempt connected: {tried}");
    match up.send(req).await {
        Err(UpstreamError::Unreachable(msg)) => assert!(msg.contains("down"), "{msg}"),
        other => panic!("expected a fast failure, got {other:?}"),
    }
    assert_eq!(accepted.load(Ordering::SeqCst), tried, "a down registry was asked again at once");
    // It comes back: the probe notices (its task ends when it does), and requests go to it again.
    let probe = lock(&up.down).get_mut(&host).and_then(|d| d.probe.take()).expect("a probe runs while down");
    broken.store(false, Ordering::SeqCst);
    tokio::time::timeout(PROBE_EVERY * 5, probe).await.expect("the probe noticed the registry was back").unwrap();
    assert!(up.send(req).await.is_ok());
}

/// A registry whose challenge sends the token request to `realm`.
async fn registry_with_realm_at(realm: &str) -> std::net::SocketAddr {
    let challenge = format!(r#"Bearer realm="{realm}",service="fake",scope="repository:lib/app:pull""#);
    serve(Router::new().fallback(move || {
        let challenge = challenge.clone();
        async move {
            let mut r: Response = StatusCode::UNAUTHORIZED.into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge.parse().unwrap());
            r
        }
    }))
    .await
}

/// An "internal service": answers anything with a token-shaped body, counting calls and credentials seen.
async fn internal_service(seen: Arc<Seen>) -> std::net::SocketAddr {
    serve(
        Router::new()
            .fallback(|State(s): State<Arc<Seen>>, req: HttpRequest| async move {
                s.token_calls.fetch_add(1, Ordering::SeqCst);
                if req.headers().contains_key(header::AUTHORIZATION) {
                    s.token_with_creds.fetch_add(1, Ordering::SeqCst);
                }
                r#"{"token":"internal-secret"}"#.into_response()
            })
            .with_state(seen),
    )
    .await
}

#[tokio::test]
async fn a_realm_on_another_host_is_not_followed() {
    let seen = Arc::new(Seen::default());
    let internal = internal_service(seen.clone()).await;
    let registry = registry_with_realm_at(&format!("http://{internal}/admin/token")).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "bot:pw").unwrap();
    let up = client(registry, Some(&creds));
    let host = RegistryHost::parse(&registry.to_string()).unwrap();
    let repo = RepoName::parse("lib/app").unwrap();
    let d = digest();
    let req = request(&host, &repo, Target::Blob(&d), true, None);
    assert!(matches!(up.send(req).await, Err(UpstreamError::Unauthorized { .. })));
    assert_eq!(seen.token_calls.load(Ordering::SeqCst), 0, "the agent called a service the registry named");
    assert_eq!(seen.token_with_creds.load(Ordering::SeqCst), 0, "configured credentials went to another host");

    // The same realm, configured for the registry: followed, with the credentials.
    let toml = format!(
        "[registry.\"{registry}\"]\nplain_http = true\ncredentials_file = \"{}\"\ntoken_hosts = [\"{internal}\"]\n",
        creds.display()
    );
    let cfg = RawConfig::from_toml(&toml).unwrap().validate().unwrap();
    let up = Upstream::new(cfg.upstream, UpstreamMetrics::default()).unwrap();
    let _ = up.send(req).await;
    assert_eq!(seen.token_calls.load(Ordering::SeqCst), 1);
    assert_eq!(seen.token_with_creds.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn unreachable_unlisted_registries_are_probed_in_bounded_number_and_forgotten_when_idle() {
    let cfg = RawConfig::from_toml("upstream_attempts = 1").unwrap().validate().unwrap();
    let up = Upstream::new(cfg.upstream, UpstreamMetrics::default()).unwrap();
    let repo = RepoName::parse("x").unwrap();
    let d = digest();
    // Clients name 40 registries nobody answers at (nothing listens on these loopback ports).
    for port in 1..=40u16 {
        let host = RegistryHost::parse(&format!("127.0.0.1:{port}")).unwrap();
        let req = request(&host, &repo, Target::Blob(&d), true, None);
        assert!(matches!(up.send(req).await, Err(UpstreamError::Unreachable(_))));
        assert!(up.down_count() <= MAX_UNLISTED_PROBES, "{} registries probed", up.down_count());
    }
    assert_eq!(up.down_count(), MAX_UNLISTED_PROBES);
    // Nobody asks for them any more: every probe ends.
    tokio::time::sleep(PROBE_IDLE + PROBE_EVERY * 3).await;
    assert_eq!(up.down_count(), 0, "probes outlived the clients that asked");
}
