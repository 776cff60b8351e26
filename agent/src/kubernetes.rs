//! Kubernetes: what the agent asks the API server. The node's zone (its `topology.kubernetes.io/zone` label, read
//! once at start with `get` on its own Node); the cluster's Nodes, listed then watched, so members' identities are
//! checked against them ([`watch_nodes`], `member_binding = "kubernetes"`); and, for the uninstall hook, whether a
//! DaemonSet's pods are all ready (`get` on that DaemonSet). The client comes from the pod's service account (or
//! `KUBECONFIG` outside a cluster).

use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::swarm::binding::{NodeBook, NodeFacts};

/// The label a node's zone is read from.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Why the API server could not answer.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No in-cluster service account and no kubeconfig.
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Config(String),
    /// The API call failed.
    #[error("{what}: {source}")]
    Api {
        /// The call.
        what: String,
        /// The error.
        source: Box<kube::Error>,
    },
    /// The label is there but cannot name a zone.
    #[error("node {node}'s label {ZONE_LABEL}=`{value}` is not a valid zone name")]
    BadZone {
        /// The node.
        node: String,
        /// The label's value.
        value: String,
    },
    /// Waited too long.
    #[error("{0}")]
    Timeout(String),
}

/// A client from the pod's service account, or from `KUBECONFIG` / `~/.kube/config` outside a cluster.
pub async fn client() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await.map_err(|e| KubeError::Config(e.to_string()))?;
    Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))
}

/// What binds a member to a Node: its addresses and zone label (a label that cannot name a zone counts as none).
pub fn node_facts(node: &Node) -> Option<(String, NodeFacts)> {
    let name = node.metadata.name.clone()?;
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).filter(|z| crate::config::valid_zone(z));
    Some((name, NodeFacts { addresses, zone: zone.cloned() }))
}

/// What a list-then-watch ([`list_watch`]) feeds: the whole set after each list, then each change.
pub trait Follower<K>: Send {
    /// Everything there is, as listed (replacing what was known).
    fn listed(&mut self, all: Vec<K>);
    /// An object was added or changed.
    fn applied(&mut self, k: K);
    /// An object was deleted.
    fn deleted(&mut self, k: K);
}

/// Lists every object of `api` (in pages of 500) into `follower`, then follows changes with a watch; relists
/// after a watch error (an expired resource version, the API server restarting) or when a watch cannot start.
/// `what` names the objects in logs. Runs until `cancel`.
pub async fn list_watch<K>(api: Api<K>, what: &str, mut follower: impl Follower<K>, cancel: CancellationToken)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let retry = Duration::from_secs(5);
    loop {
        let listed = tokio::select! {
            () = cancel.cancelled() => return,
            r = list_all(&api, what) => r,
        };
        let mut version = match listed {
            Ok((all, version)) => {
                tracing::info!(objects = all.len(), "{what} listed");
                follower.listed(all);
                version
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list {what}: listing again in 5 s");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(retry) => continue,
                }
            }
        };
        // Watch from the list's version; a watch that ends (its timeout) is started again from the last version.
        loop {
            let started = Instant::now();
            let wp = WatchParams::default().timeout(290);
            let stream = match api.watch(&wp, &version).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch {what}: listing again");
                    break;
                }
            };
            let mut stream = stream.boxed();
            let mut relist = false;
            loop {
                let event = tokio::select! {
                    () = cancel.cancelled() => return,
                    e = stream.try_next() => e,
                };
                let seen = |k: &K, version: &mut String| {
                    if let Some(v) = k.meta().resource_version.clone() {
                        *version = v;
                    }
                };
                match event {
                    Ok(Some(WatchEvent::Added(k) | WatchEvent::Modified(k))) => {
                        seen(&k, &mut version);
                        follower.applied(k);
                    }
                    Ok(Some(WatchEvent::Deleted(k))) => {
                        seen(&k, &mut version);
                        follower.deleted(k);
                    }
                    Ok(Some(WatchEvent::Bookmark(b))) => version = b.metadata.resource_version,
                    Ok(Some(WatchEvent::Error(e))) => {
                        tracing::debug!(code = e.code, message = %e.message, "{what} watch error: listing again");
                        relist = true;
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "{what} watch failed: listing again");
                        relist = true;
                        break;
                    }
                }
            }
            if relist {
                break;
            }
            // A watch that ended at once (a server that does not hold watches open) is not restarted in a loop.
            if started.elapsed() < Duration::from_secs(1) {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn list_all<K>(api: &Api<K>, what: &str) -> Result<(Vec<K>, String), KubeError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut all = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page =
            api.list(&lp).await.map_err(|e| KubeError::Api { what: format!("listing {what}"), source: Box::new(e) })?;
        all.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok((all, page.metadata.resource_version.unwrap_or_default())),
        }
    }
}

/// The Nodes into a [`NodeBook`].
struct NodeFollower(Arc<NodeBook>);

impl Follower<Node> for NodeFollower {
    fn listed(&mut self, all: Vec<Node>) {
        self.0.replace_all(all.iter().filter_map(node_facts).collect::<HashMap<_, _>>());
    }
    fn applied(&mut self, n: Node) {
        if let Some((name, facts)) = node_facts(&n) {
            self.0.upsert(name, facts);
        }
    }
    fn deleted(&mut self, n: Node) {
        if let Some(name) = &n.metadata.name {
            self.0.remove(name);
        }
    }
}

/// Lists every Node into `book`, then follows changes ([`list_watch`]): members are checked against them. Runs
/// until `cancel`.
pub async fn watch_nodes(client: Client, book: Arc<NodeBook>, cancel: CancellationToken) {
    list_watch(Api::<Node>::all(client), "Nodes", NodeFollower(book), cancel).await;
}

/// The zone label of node `name`: `None` when the node has no such label.
pub async fn node_zone(client: Client, name: &str) -> Result<Option<String>, KubeError> {
    let nodes: Api<Node> = Api::all(client);
    let node = nodes
        .get(name)
        .await
        .map_err(|e| KubeError::Api { what: format!("reading node {name}"), source: Box::new(e) })?;
    let Some(value) = node.metadata.labels.and_then(|mut l| l.remove(ZONE_LABEL)) else { return Ok(None) };
    if !crate::config::valid_zone(&value) {
        return Err(KubeError::BadZone { node: name.to_owned(), value });
    }
    Ok(Some(value))
}

/// Waits until every pod of DaemonSet `namespace/name` is scheduled, up to date and ready (at least one
/// observed generation after its creation), polling every `every`, for up to `timeout`.
pub async fn wait_daemonset_ready(
    client: Client,
    namespace: &str,
    name: &str,
    every: Duration,
    timeout: Duration,
) -> Result<(), KubeError> {
    let sets: Api<DaemonSet> = Api::namespaced(client, namespace);
    let deadline = Instant::now() + timeout;
    loop {
        let ds = sets.get(name).await.map_err(|e| KubeError::Api {
            what: format!("reading daemonset {namespace}/{name}"),
            source: Box::new(e),
        })?;
        let generation = ds.metadata.generation.unwrap_or(0);
        if let Some(s) = &ds.status {
            let observed = s.observed_generation.unwrap_or(0) >= generation;
            let updated = s.updated_number_scheduled.unwrap_or(0);
            if observed && s.number_ready == s.desired_number_scheduled && updated == s.desired_number_scheduled {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(KubeError::Timeout(format!(
                "daemonset {namespace}/{name} not ready after {}",
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use axum::extract::Path;
    use axum::routing::get;
    use serde_json::json;

    use super::*;

    fn json_body(v: &serde_json::Value) -> ([(http::HeaderName, &'static str); 1], String) {
        ([(http::header::CONTENT_TYPE, "application/json")], v.to_string())
    }

    /// A fake API server over HTTP: nodes `a` (zoned), `b` (no labels), `bad` (an unusable zone), and a DaemonSet
    /// `ns/restore` that becomes ready on the third read.
    async fn fake_api() -> (Client, Arc<AtomicU32>) {
        let reads = Arc::new(AtomicU32::new(0));
        let r = reads.clone();
        let app = axum::Router::new()
            .route(
                "/api/v1/nodes/{name}",
                get(|Path(name): Path<String>| async move {
                    let labels = match name.as_str() {
                        "a" => json!({ZONE_LABEL: "eu-west-1a", "kubernetes.io/os": "linux"}),
                        "b" => json!({}),
                        "bad" => json!({ZONE_LABEL: "no spaces allowed"}),
                        _ => {
                            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": format!("nodes \"{name}\" not found")});
                            return (http::StatusCode::NOT_FOUND, json_body(&status));
                        }
                    };
                    let node =
                        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
                    (http::StatusCode::OK, json_body(&node))
                }),
            )
            .route(
                "/apis/apps/v1/namespaces/ns/daemonsets/restore",
                get(move || {
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let ready = if n >= 3 { 2 } else { 1 };
                        json_body(&json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                            "metadata": {"name": "restore", "namespace": "ns", "generation": 1},
                            "spec": {"selector": {}, "template": {}},
                            "status": {"observedGeneration": 1, "desiredNumberScheduled": 2, "numberReady": ready,
                                "updatedNumberScheduled": 2, "currentNumberScheduled": 2, "numberMisscheduled": 0}}))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        (Client::try_from(config).unwrap(), reads)
    }

    #[tokio::test]
    async fn the_zone_comes_from_the_nodes_label() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (client, _) = fake_api().await;
        assert_eq!(node_zone(client.clone(), "a").await.unwrap().as_deref(), Some("eu-west-1a"));
        assert_eq!(node_zone(client.clone(), "b").await.unwrap(), None);
        assert!(matches!(node_zone(client.clone(), "bad").await, Err(KubeError::BadZone { .. })));
        let err = node_zone(client, "missing").await.unwrap_err();
        assert!(err.to_string().contains("reading node missing"), "{err}");
    }

    #[tokio::test]
    async fn waits_until_every_restore_pod_is_ready() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (client, reads) = fake_api().await;
        let every = Duration::from_millis(10);
        wait_daemonset_ready(client.clone(), "ns", "restore", every, Duration::from_secs(5)).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 3, "ready on the third read, not before");
        let err = wait_daemonset_ready(client, "ns", "other", every, Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, KubeError::Api { .. }), "{err}");
    }

    #[tokio::test]
    async fn nodes_are_listed_in_pages_then_watched() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let node = |name: &str, ip: &str, zone: Option<&str>| {
            let labels = zone.map_or(json!({}), |z| json!({ZONE_LABEL: z}));
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "resourceVersion": "5", "labels": labels},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}})
        };
        let (n1, n2, n3) =
            (node("n1", "10.0.0.1", Some("z1")), node("n2", "10.0.0.2", None), node("n3", "10.0.0.3", Some("z3")));
        let app = axum::Router::new().route(
            "/api/v1/nodes",
            get(move |q: axum::extract::RawQuery| {
                let (n1, n2, n3) = (n1.clone(), n2.clone(), n3.clone());
                async move {
                    let q = q.0.unwrap_or_default();
                    if q.contains("watch=true") {
                        // One change, then the watch ends (its timeout): the watcher starts another.
                        let ev = json!({"type": "ADDED", "object": n3});
                        return ([(http::header::CONTENT_TYPE, "application/json")], format!("{ev}\n"));
                    }
                    let (items, cont) = if q.contains("continue=page2") { (vec![n2], "") } else { (vec![n1], "page2") };
                    json_body(&json!({"apiVersion": "v1", "kind": "NodeList",
                        "metadata": {"resourceVersion": "5", "continue": cont}, "items": items}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
        let book = Arc::new(NodeBook::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch_nodes(client, book.clone(), cancel.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while book.len() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
        task.await.unwrap();
        assert!(book.is_ready());
        assert_eq!(
            book.get("n1"),
            Some(NodeFacts { addresses: vec!["10.0.0.1".parse().unwrap()], zone: Some("z1".into()) })
        );
        assert_eq!(book.get("n2"), Some(NodeFacts { addresses: vec!["10.0.0.2".parse().unwrap()], zone: None }));
        assert_eq!(book.get("n3").map(|f| f.zone), Some(Some("z3".into())), "from the watch");
    }
}
