//! A fake Kubernetes API server (the one mock the testbed allows: no cluster can run here). It serves Nodes — `get`
//! by name, `list`, and a `watch` that ends at once (the agent watches again) — and `ImageCache` objects and
//! workloads (Deployments, StatefulSets, DaemonSets: list, a watch that streams changes from the version asked for,
//! and ImageCaches' status subresource's merge patch, recording who wrote it), and writes kubeconfigs pointing at itself, which agents find through `KUBECONFIG` as outside a
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

/// The objects the fake holds besides Nodes (ImageCaches, workloads), and their history.
#[derive(Debug, Default)]
struct Caches {
    /// By (resource path `group/version/plural`, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
    /// The last resource version given out (one sequence for all, as etcd's).
    version: u64,
    /// Every change: (version, resource path, watch event).
    log: Vec<(u64, String, Value)>,
    /// Status writes: (namespace, name, the writer's bearer token).
    writers: Vec<(String, String, String)>,
}

#[derive(Debug, Clone)]
struct Shared {
    caches: Arc<Mutex<Caches>>,
    changes: broadcast::Sender<(u64, String, Value)>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.caches.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a change (`ADDED`, `MODIFIED`, `DELETED`) of `obj` of resource `res`, stamping its version.
    fn change(&self, c: &mut Caches, res: &str, kind: &str, obj: &mut Value) {
        c.version += 1;
        obj["metadata"]["resourceVersion"] = json!(c.version.to_string());
        let ev = json!({"type": kind, "object": obj.clone()});
        c.log.push((c.version, res.to_owned(), ev.clone()));
        let _ = self.changes.send((c.version, res.to_owned(), ev));
    }

    /// Creates or replaces `res` object `namespace/name` with `spec` (a new generation when the spec changed).
    fn put(&self, res: &str, kind: &str, namespace: &str, name: &str, spec: Value) {
        let mut c = self.lock();
        let key = (res.to_owned(), namespace.to_owned(), name.to_owned());
        let api_version = res.rsplit_once('/').map_or(res, |(gv, _)| gv);
        let (change, mut obj) = match c.objects.get(&key) {
            Some(old) if old["spec"] == spec => return,
            Some(old) => {
                let mut o = old.clone();
                o["spec"] = spec;
                o["metadata"]["generation"] = json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
                ("MODIFIED", o)
            }
            None => (
                "ADDED",
                json!({"apiVersion": api_version, "kind": kind,
                    "metadata": {"name": name, "namespace": namespace, "generation": 1, "uid": format!("uid-{res}-{namespace}-{name}")},
                    "spec": spec}),
            ),
        };
        self.change(&mut c, res, change, &mut obj);
        c.objects.insert(key, obj);
    }

    fn delete(&self, res: &str, namespace: &str, name: &str) {
        let mut c = self.lock();
        if let Some(mut obj) = c.objects.remove(&(res.to_owned(), namespace.to_owned(), name.to_owned())) {
            self.change(&mut c, res, "DELETED", &mut obj);
        }
    }
}

/// ImageCaches' resource path.
const CACHES: &str = "shoal.dev/v1alpha1/imagecaches";

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

/// A list of every object of a resource, or with `watch=true` a stream of its changes after `resourceVersion`,
/// held open up to `timeoutSeconds`.
async fn list_or_watch(
    State(shared): State<Shared>,
    Path((group, version, plural)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let res = format!("{group}/{version}/{plural}");
    let q = q.unwrap_or_default();
    if query_param(&q, "watch") != Some("true") {
        let c = shared.lock();
        let items: Vec<Value> = c.objects.iter().filter(|(k, _)| k.0 == res).map(|(_, v)| v.clone()).collect();
        let list = json!({"apiVersion": format!("{group}/{version}"), "kind": "List",
            "metadata": {"resourceVersion": c.version.to_string()}, "items": items});
        return json_response(http::StatusCode::OK, &list).into_response();
    }
    let from: u64 = query_param(&q, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let secs: u64 = query_param(&q, "timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290);
    // Subscribed before the log is read: nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let past: Vec<(u64, Value)> =
        shared.lock().log.iter().filter(|(v, r, _)| *v > from && *r == res).map(|(v, _, e)| (*v, e.clone())).collect();
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
            let Ok(Ok((v, r, ev))) = next else { return };
            if v > last && r == res {
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
    let key = (CACHES.to_owned(), ns.clone(), name.clone());
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
    shared.change(&mut c, CACHES, "MODIFIED", &mut obj);
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
        Self::start_at(nodes, IpAddr::from([127, 0, 0, 1])).await
    }

    /// Serves `nodes` on `ip` (a bridge's host address, for agents in network namespaces).
    pub async fn start_at(nodes: Vec<FakeNode>, ip: IpAddr) -> Result<Self> {
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
            .route("/apis/{group}/{version}/{plural}", get(list_or_watch))
            .route("/apis/shoal.dev/v1alpha1/namespaces/{ns}/imagecaches/{name}/status", patch(patch_cache_status))
            .with_state(shared.clone());
        let app = app.merge(caches);
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
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
        self.shared.put(CACHES, "ImageCache", namespace, name, spec);
    }

    /// Deletes ImageCache `namespace/name`.
    pub fn delete_image_cache(&self, namespace: &str, name: &str) {
        self.shared.delete(CACHES, namespace, name);
    }

    /// ImageCache `namespace/name` as stored (status included).
    pub fn image_cache(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().objects.get(&(CACHES.to_owned(), namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Creates or updates a workload (`kind` Deployment, StatefulSet or DaemonSet) `namespace/name` whose pod
    /// template runs `images` (as the one container each).
    pub fn put_workload(&self, kind: &str, namespace: &str, name: &str, images: &[&str]) {
        let plural = format!("apps/v1/{}s", kind.to_lowercase());
        let containers: Vec<Value> =
            images.iter().enumerate().map(|(i, im)| json!({"name": format!("c{i}"), "image": im})).collect();
        let spec = json!({"selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}});
        self.shared.put(&plural, kind, namespace, name, spec);
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
