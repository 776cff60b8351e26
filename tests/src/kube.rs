//! A fake Kubernetes API server (the one mock the testbed allows: no cluster can run here). It serves Nodes — `get`
//! by name, `list`, and a `watch` that ends at once (the agent watches again) — and writes a kubeconfig pointing
//! at itself, which agents find through `KUBECONFIG` as outside a cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use axum::extract::{Path, RawQuery};
use axum::routing::get;
use serde_json::{Value, json};

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

/// The running fake.
#[derive(Debug)]
pub struct FakeApi {
    /// Its address.
    pub addr: SocketAddr,
    /// A kubeconfig naming it.
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::Builder::new().prefix("shoal-fake-api").tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n\
                 current-context: c\n"
            ),
        )?;
        Ok(Self { addr, kubeconfig, _dir: dir, task })
    }

    /// The kubeconfig's path as a string (for `KUBECONFIG`).
    pub fn kubeconfig_env(&self) -> Result<&str> {
        self.kubeconfig.to_str().context("kubeconfig path is not UTF-8")
    }
}
