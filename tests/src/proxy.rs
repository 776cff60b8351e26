//! An HTTP hop in front of the upstream registry: counts every request by method and path, and injects faults
//! into blob bodies (a lying upstream, a crawling one).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures_util::StreamExt;

/// What the proxy does to blob GET bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass through untouched.
    None,
    /// Flip the bits of the first byte of every blob body (an upstream serving bytes that do not match).
    CorruptBlobs,
    /// Send blob bodies at about this many bytes per second.
    Throttle(u64),
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    client: reqwest::Client,
    counts: Mutex<HashMap<String, usize>>,
    fault: Mutex<Fault>,
    stopped: Arc<AtomicBool>,
    /// Response body bytes sent to clients.
    body_bytes: Arc<AtomicU64>,
}

/// The proxy's counters, readable from anywhere (also from outside the runtime the proxy runs on).
#[derive(Debug, Clone)]
pub struct ProxyStats(Arc<Shared>);

impl ProxyStats {
    /// Requests seen whose `METHOD path` ends with `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        let counts = self.0.counts.lock().expect("proxy lock");
        counts.iter().filter(|(k, _)| k.starts_with(method) && k.ends_with(suffix)).map(|(_, n)| n).sum()
    }

    /// Response body bytes sent so far.
    pub fn body_bytes(&self) -> u64 {
        self.0.body_bytes.load(Ordering::Relaxed)
    }

    /// Forgets the counts and bytes.
    pub fn reset(&self) {
        self.0.counts.lock().expect("proxy lock").clear();
        self.0.body_bytes.store(0, Ordering::Relaxed);
    }
}

/// The counting proxy. Stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        Self::start_on(0, target).await
    }

    /// Starts a proxy on `port` (0 for any) forwarding to `target`.
    pub async fn start_on(port: u16, target: SocketAddr) -> Result<Self> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], port)), target).await
    }

    /// Starts a proxy listening on `addr` forwarding to `target`.
    pub async fn start_at(addr: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            client: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().build()?,
            counts: Mutex::default(),
            fault: Mutex::new(Fault::None),
            stopped: Arc::default(),
            body_bytes: Arc::default(),
        });
        let app = axum::Router::new().fallback(forward).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task: Some(task) })
    }

    /// `127.0.0.1:PORT`, the registry host name clients use.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters, as a handle that outlives nothing but can be read from any thread.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats(self.shared.clone())
    }

    /// Sets the fault mode for later requests.
    pub fn set_fault(&self, f: Fault) {
        *self.shared.fault.lock().expect("proxy lock") = f;
    }

    /// Requests seen whose `METHOD path` ends with `suffix`, e.g. `GET` and `/blobs/sha256:…`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        let counts = self.shared.counts.lock().expect("proxy lock");
        counts.iter().filter(|(k, _)| k.starts_with(method) && k.ends_with(suffix)).map(|(_, n)| n).sum()
    }

    /// All counts, `METHOD path` → n.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.shared.counts.lock().expect("proxy lock").clone()
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        self.shared.counts.lock().expect("proxy lock").clear();
    }

    /// Stops listening and cuts every body in flight.
    pub fn stop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A [`Proxy`] running inside a network namespace, on a thread of its own (see [`crate::netns::Netns::spawn`]).
/// Stops when dropped.
#[derive(Debug)]
pub struct NsProxy {
    stats: ProxyStats,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl NsProxy {
    /// Starts a proxy in `ns` listening on `listen` (an address of that namespace), forwarding to `target`.
    pub async fn start(ns: &crate::netns::Netns, listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let (stats_tx, stats_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = ns.spawn(move || async move {
            let proxy = Proxy::start_at(listen, target).await?;
            let _ = stats_tx.send(proxy.stats());
            let _ = stop_rx.await;
            Ok(())
        });
        match stats_rx.await {
            Ok(stats) => Ok(Self { stats, stop: Some(stop) }),
            Err(_) => Err(task.await?.err().unwrap_or_else(|| anyhow::anyhow!("the proxy did not start"))),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for NsProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    *s.counts.lock().expect("proxy lock").entry(format!("{method} {path}")).or_default() += 1;
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut rb = s.client.request(method.clone(), format!("http://{}{pq}", s.target));
    for (k, v) in req.headers() {
        if k != http::header::HOST {
            rb = rb.header(k, v);
        }
    }
    let body = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap_or_default();
    let resp = match rb.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Response::builder().status(502).body(Body::from(e.to_string())).expect("a valid response");
        }
    };
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        out = out.header(k, v);
    }
    let is_blob = method == http::Method::GET && path.contains("/blobs/sha256:");
    let fault = if is_blob { *s.fault.lock().expect("proxy lock") } else { Fault::None };
    let stopped = s.stopped.clone();
    let body_bytes = s.body_bytes.clone();
    let mut first = true;
    let stream = resp.bytes_stream().then(move |chunk| {
        let stopped = stopped.clone();
        let body_bytes = body_bytes.clone();
        let corrupt = fault == Fault::CorruptBlobs && std::mem::take(&mut first);
        async move {
            if stopped.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("proxy stopped"));
            }
            let mut chunk = chunk.map_err(std::io::Error::other)?;
            if corrupt && !chunk.is_empty() {
                let mut v = chunk.to_vec();
                v[0] ^= 0xff;
                chunk = v.into();
            }
            if let Fault::Throttle(bps) = fault {
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / bps as f64)).await;
            }
            body_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Ok::<_, std::io::Error>(chunk)
        }
    });
    out.body(Body::from_stream(stream)).expect("a valid response")
}
