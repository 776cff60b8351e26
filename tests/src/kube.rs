//! A fake Kubernetes API server (the one mock the testbed allows: no cluster can run here). It serves Nodes — `get`
//! by name, `list`, and a `watch` that ends at once (the agent watches again) — and `ImageCache` objects (list, a
//! watch that streams changes from the version asked for, and the status subresource's merge patch, recording who
//! wrote it), and writes kubeconfigs pointing at itself, which agents find through `KUBECONFIG` as outside a
//! cluster (one per agent with a token of its own, to tell the writers apart).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, patch};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A Node the fake serves.
#[derive(Debug, Clone)]
pub struct FakeNode {
    /// Its name.
    pub name: String,
    /// Its InternalIP.
    pub ip: IpAddr,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl FakeNode {
    /// A node named `name` at `ip`, in `zone` if any.
    pub fn new(name: &str, ip: impl Into<IpAddr>, zone: Option<&str>) -> Self {
        Self { name: name.to_owned(), ip: ip.into(), zone: zone.map(str::to_owned) }
    }

    fn json(&self) -> Value {
        let labels = self.zone.as_ref().map_or(json!({}), |z| json!({"topology.kubernetes.io/zone": z}));
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "resourceVersion": "1", "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": self.ip.to_string()},
                                     {"type": "Hostname", "address": self.name}]}})
    }
}

/// The ImageCache objects the fake holds, and their history.
#[derive(Debug, Default)]
struct Caches {
    /// By (namespace, name).
    objects: BTreeMap<(String, String), Value>,
    /// The last resource version given out.
    version: u64,
    /// Every change: (version, watch event).
    log: Vec<(u64, Value)>,
    /// Status writes: (namespace, name, the writer's bearer token).
    writers: Vec<(String, String, String)>,
}

#[derive(Debug, Clone)]
struct Shared {
    caches: Arc<Mutex<Caches>>,
    changes: broadcast::Sender<(u64, Value)>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.caches.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a change (`ADDED`, `MODIFIED`, `DELETED`) of `obj`, stamping its resource version.
    fn change(&self, c: &mut Caches, kind: &str, obj: &mut Value) {
        c.version += 1;
        obj["metadata"]["resourceVersion"] = json!(c.version.to_string());
        let ev = json!({"type": kind, "object": obj.clone()});
        c.log.push((c.version, ev.clone()));
        let _ = self.changes.send((c.version, ev));
    }
}

/// The running fake.
#[derive(Debug)]
pub struct FakeApi {
    /// Its address.
    pub addr: SocketAddr,
    /// A kubeconfig naming it.
    pub kubeconfig: PathBuf,
    shared: Shared,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write_kubeconfig(dir: &std::path::Path, addr: SocketAddr, token: Option<&str>) -> Result<PathBuf> {
    let (file, user) = match token {
        Some(t) => (format!("kubeconfig-{t}"), format!("{{token: \"{t}\"}}")),
        None => ("kubeconfig".to_owned(), "{}".to_owned()),
    };
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
             users: [{{name: u, user: {user}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n\
             current-context: c\n"
        ),
    )?;
    Ok(path)
}

fn query_param<'a>(q: &'a str, key: &str) -> Option<&'a str> {
    q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// A list, or with `watch=true` a stream of changes after `resourceVersion`, held open up to `timeoutSeconds`.
async fn list_or_watch_caches(State(shared): State<Shared>, RawQuery(q): RawQuery) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let q = q.unwrap_or_default();
    if query_param(&q, "watch") != Some("true") {
        let c = shared.lock();
        let items: Vec<Value> = c.objects.values().cloned().collect();
        let list = json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "ImageCacheList",
            "metadata": {"resourceVersion": c.version.to_string()}, "items": items});
        return json_response(http::StatusCode::OK, &list).into_response();
    }
    let from: u64 = query_param(&q, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let secs: u64 = query_param(&q, "timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290);
    // Subscribed before the log is read: nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let past: Vec<(u64, Value)> = shared.lock().log.iter().filter(|(v, _)| *v > from).cloned().collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut last = from;
        let line = |ev: &Value| bytes::Bytes::from(format!("{ev}\n"));
        for (v, ev) in past {
            last = v;
            if tx.send(Ok(line(&ev))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let next = tokio::time::timeout_at(deadline, live.recv()).await;
            let Ok(Ok((v, ev))) = next else { return };
            if v > last {
                last = v;
                if tx.send(Ok(line(&ev))).await.is_err() {
                    return;
                }
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A merge patch of an object's status; the writer's token is recorded.
async fn patch_cache_status(
    State(shared): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return json_response(http::StatusCode::BAD_REQUEST, &json!({"kind": "Status", "code": 400})).into_response();
    };
    let writer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let mut c = shared.lock();
    let key = (ns.clone(), name.clone());
    let Some(mut obj) = c.objects.get(&key).cloned() else {
        return json_response(
            http::StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("imagecaches.shoal.dev \"{name}\" not found")}),
        )
        .into_response();
    };
    // Only the status: a merge patch of the status subresource changes nothing else.
    if let Some(status) = patch.get("status") {
        obj["status"] = status.clone();
    }
    shared.change(&mut c, "MODIFIED", &mut obj);
    c.objects.insert(key, obj.clone());
    c.writers.push((ns, name, writer));
    json_response(http::StatusCode::OK, &obj).into_response()
}

fn json_response(status: http::StatusCode, v: &Value) -> impl axum::response::IntoResponse + use<> {
    (status, [(http::header::CONTENT_TYPE, "application/json")], v.to_string())
}

impl FakeApi {
    /// Serves `nodes` on 127.0.0.1.
    pub async fn start(nodes: Vec<FakeNode>) -> Result<Self> {
        let by_name = nodes.clone();
        let app = axum::Router::new()
            .route(
                "/api/v1/nodes/{name}",
                get(move |Path(name): Path<String>| {
                    let found = by_name.iter().find(|n| n.name == name).map(FakeNode::json);
                    async move {
                        match found {
                            Some(n) => json_response(http::StatusCode::OK, &n),
                            None => json_response(
                                http::StatusCode::NOT_FOUND,
                                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                    "code": 404, "message": format!("nodes \"{name}\" not found")}),
                            ),
                        }
                    }
                }),
            )
            .route(
                "/api/v1/nodes",
                get(move |RawQuery(q): RawQuery| {
                    let items: Vec<Value> = nodes.iter().map(FakeNode::json).collect();
                    async move {
                        if q.unwrap_or_default().contains("watch=true") {
                            return (
                                http::StatusCode::OK,
                                [(http::header::CONTENT_TYPE, "application/json")],
                                String::new(),
                            );
                        }
                        let list = json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"},
                            "items": items});
                        (http::StatusCode::OK, [(http::header::CONTENT_TYPE, "application/json")], list.to_string())
                    }
                }),
            );
        let (changes, _) = broadcast::channel(1024);
        let shared = Shared { caches: Arc::default(), changes };
        let caches = axum::Router::new()
            .route("/apis/shoal.dev/v1alpha1/imagecaches", get(list_or_watch_caches))
            .route("/apis/shoal.dev/v1alpha1/namespaces/{ns}/imagecaches/{name}/status", patch(patch_cache_status))
            .with_state(shared.clone());
        let app = app.merge(caches);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::Builder::new().prefix("shoal-fake-api").tempdir()?;
        let kubeconfig = write_kubeconfig(dir.path(), addr, None)?;
        Ok(Self { addr, kubeconfig, shared, dir, task })
    }

    /// A kubeconfig whose user sends `token` (so the fake can tell this client's writes apart).
    pub fn kubeconfig_with_token(&self, token: &str) -> Result<String> {
        let path = write_kubeconfig(self.dir.path(), self.addr, Some(token))?;
        Ok(path.to_str().context("kubeconfig path is not UTF-8")?.to_owned())
    }

    /// Creates or replaces ImageCache `namespace/name` with `spec` (a new generation when the spec changed).
    pub fn put_image_cache(&self, namespace: &str, name: &str, spec: Value) {
        let mut c = self.shared.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let (kind, mut obj) = match c.objects.get(&key) {
            Some(old) if old["spec"] == spec => return,
            Some(old) => {
                let mut o = old.clone();
                o["spec"] = spec;
                o["metadata"]["generation"] = json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
                ("MODIFIED", o)
            }
            None => (
                "ADDED",
                json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "ImageCache",
                    "metadata": {"name": name, "namespace": namespace, "generation": 1, "uid": format!("uid-{name}")},
                    "spec": spec}),
            ),
        };
        self.shared.change(&mut c, kind, &mut obj);
        c.objects.insert(key, obj);
    }

    /// Deletes ImageCache `namespace/name`.
    pub fn delete_image_cache(&self, namespace: &str, name: &str) {
        let mut c = self.shared.lock();
        if let Some(mut obj) = c.objects.remove(&(namespace.to_owned(), name.to_owned())) {
            self.shared.change(&mut c, "DELETED", &mut obj);
        }
    }

    /// ImageCache `namespace/name` as stored (status included).
    pub fn image_cache(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().objects.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// The tokens of the clients that wrote `namespace/name`'s status, one per write.
    pub fn status_writers(&self, namespace: &str, name: &str) -> Vec<String> {
        let c = self.shared.lock();
        c.writers.iter().filter(|(n, m, _)| n == namespace && m == name).map(|(_, _, w)| w.clone()).collect()
    }

    /// The kubeconfig's path as a string (for `KUBECONFIG`).
    pub fn kubeconfig_env(&self) -> Result<&str> {
        self.kubeconfig.to_str().context("kubeconfig path is not UTF-8")
    }
}
