//! Prefetch on rollouts (`prefetch_rollouts = true`): when a workload's pod template names an image it did not name
//! before, each zone fetches it once, before the kubelets ask.
//!
//! **Who watches**: in each zone, the home of the key `prefetch/rollouts` — one watcher per zone, so the API server
//! serves as many watches as there are zones, not one per node. When members come and go the role moves within
//! [`CHECK`]; the new watcher lists first, and a first list only records (a restarted watcher does not prefetch
//! every image in the cluster), so a change made during the hand-over is not prefetched.
//!
//! **What it does**: it follows Deployments, StatefulSets and DaemonSets (list, then watch; the chart adds the
//! read-only RBAC only when this is enabled), remembers the images of each object's pod template (containers and
//! init containers), and when an object is created or changed with images it did not have, preheats each new
//! image into its own zone (as `shoal preheat --zones <zone>`: through the zone's home, one crossing from upstream
//! for the whole cluster, this node's platform of an index). The same image is not prefetched again within
//! [`AGAIN_AFTER`]. Images are parsed as the kubelet names them (no registry: Docker Hub); one the agent cannot
//! fetch (a registry it does not proxy, a private image without its credentials) is logged and left to the pull.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::{Api, Client};
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pull::{ImageRef, Platform};
use super::{AdminState, preheat};
use crate::kubernetes::{Follower, list_watch};
use crate::mesh::Mesh;
use crate::oci::Digest;

/// How often an agent looks whether it is (still) its zone's watcher.
pub const CHECK: Duration = Duration::from_secs(5);
/// An image prefetched is not prefetched again before this.
pub const AGAIN_AFTER: Duration = Duration::from_secs(600);
/// How long one prefetch may take.
const TIMEOUT: Duration = Duration::from_secs(600);
/// Prefetches running at once on the watcher.
const CONCURRENT: usize = 4;

/// A workload's identity and its pod template's images.
#[derive(Debug)]
struct Seen {
    kind: &'static str,
    /// `namespace/name`.
    key: String,
    images: BTreeSet<String>,
}

fn template_images(t: Option<&PodTemplateSpec>) -> BTreeSet<String> {
    let Some(spec) = t.and_then(|t| t.spec.as_ref()) else { return BTreeSet::new() };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.image.clone())
        .filter(|i| !i.is_empty())
        .collect()
}

/// A workload kind the watcher follows.
trait Workload: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope> {
    const KIND: &'static str;
    fn template(&self) -> Option<&PodTemplateSpec>;
    fn seen(&self) -> Option<Seen> {
        let m = self.meta();
        Some(Seen {
            kind: Self::KIND,
            key: format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?),
            images: template_images(self.template()),
        })
    }
}

impl Workload for Deployment {
    const KIND: &'static str = "Deployment";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
}

impl Workload for StatefulSet {
    const KIND: &'static str = "StatefulSet";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
}

impl Workload for DaemonSet {
    const KIND: &'static str = "DaemonSet";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|s| &s.template)
    }
}

#[derive(Debug)]
enum Event {
    Listed(&'static str, Vec<Seen>),
    Applied(Seen),
    Deleted(Seen),
}

struct Feed(mpsc::UnboundedSender<Event>);

impl<K: Workload> Follower<K> for Feed {
    fn listed(&mut self, all: Vec<K>) {
        let _ = self.0.send(Event::Listed(K::KIND, all.iter().filter_map(Workload::seen).collect()));
    }
    fn applied(&mut self, k: K) {
        if let Some(s) = k.seen() {
            let _ = self.0.send(Event::Applied(s));
        }
    }
    fn deleted(&mut self, k: K) {
        if let Some(s) = k.seen() {
            let _ = self.0.send(Event::Deleted(s));
        }
    }
}

/// Whether this agent is its zone's watcher.
fn is_watcher(mesh: &Mesh) -> bool {
    let view = mesh.view();
    let key = Digest::from_sha256(&sha2::Sha256::digest(b"prefetch/rollouts"));
    view.home_in(&view.zone, &key) == Some(view.me)
}

/// Takes the zone watcher's role whenever this agent holds it, until `cancel`.
pub fn spawn(client: Client, st: Arc<AdminState>, mesh: Arc<Mesh>, tasks: &TaskTracker, cancel: CancellationToken) {
    let t = tasks.clone();
    tasks.spawn(async move {
        let mut watching: Option<CancellationToken> = None;
        let mut every = tokio::time::interval(CHECK);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            match (is_watcher(&mesh), &watching) {
                (true, None) => {
                    tracing::info!(zone = %mesh.view().zone, "watching rollouts for this zone");
                    let stop = cancel.child_token();
                    watch(client.clone(), st.clone(), mesh.clone(), &t, stop.clone());
                    watching = Some(stop);
                }
                (false, Some(stop)) => {
                    tracing::info!("no longer this zone's rollout watcher");
                    stop.cancel();
                    watching = None;
                }
                _ => {}
            }
        }
    });
}

fn watch(client: Client, st: Arc<AdminState>, mesh: Arc<Mesh>, tasks: &TaskTracker, stop: CancellationToken) {
    let (tx, rx) = mpsc::unbounded_channel();
    tasks.spawn(list_watch(Api::<Deployment>::all(client.clone()), "Deployments", Feed(tx.clone()), stop.clone()));
    tasks.spawn(list_watch(Api::<StatefulSet>::all(client.clone()), "StatefulSets", Feed(tx.clone()), stop.clone()));
    tasks.spawn(list_watch(Api::<DaemonSet>::all(client), "DaemonSets", Feed(tx), stop.clone()));
    tasks.spawn(follow(st, mesh, rx, tasks.clone(), stop));
}

async fn follow(
    st: Arc<AdminState>,
    mesh: Arc<Mesh>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    // (kind, namespace/name) → images; None until that kind's first list.
    let mut known: BTreeMap<(&'static str, String), BTreeSet<String>> = BTreeMap::new();
    let mut listed: BTreeSet<&'static str> = BTreeSet::new();
    let mut recent: HashMap<String, Instant> = HashMap::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return,
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
        };
        let new_images: Vec<String> = match ev {
            Event::Listed(kind, all) => {
                // A first list records; a relist (after a watch error) prefetches what changed meanwhile.
                let first = listed.insert(kind);
                let mut before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                known.retain(|(k, key), images| {
                    if *k == kind {
                        before.insert(key.clone(), std::mem::take(images));
                    }
                    *k != kind
                });
                let mut fresh = Vec::new();
                for s in all {
                    if !first {
                        let old = before.get(&s.key);
                        fresh.extend(s.images.iter().filter(|i| old.is_none_or(|o| !o.contains(*i))).cloned());
                    }
                    known.insert((kind, s.key), s.images);
                }
                fresh
            }
            Event::Applied(s) => {
                let old = known.insert((s.kind, s.key.clone()), s.images.clone()).unwrap_or_default();
                let added: Vec<String> = s.images.difference(&old).cloned().collect();
                if !added.is_empty() {
                    tracing::info!(kind = s.kind, workload = %s.key, images = ?added, "rollout: prefetching");
                }
                added
            }
            Event::Deleted(s) => {
                known.remove(&(s.kind, s.key));
                Vec::new()
            }
        };
        recent.retain(|_, at| at.elapsed() < AGAIN_AFTER);
        for image in new_images {
            if recent.contains_key(&image) {
                continue;
            }
            recent.insert(image.clone(), Instant::now());
            let (st, mesh, slots) = (st.clone(), mesh.clone(), slots.clone());
            tasks.spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else { return };
                prefetch(&st, &mesh, &image).await;
            });
        }
    }
}

/// Preheats `image` into this node's zone.
async fn prefetch(st: &AdminState, mesh: &Arc<Mesh>, image: &str) {
    let parsed = match ImageRef::parse(image, st.resolver.upstream().default_registry()) {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!(image, error = %e, "rollout: not an image reference the agent can fetch");
            return;
        }
    };
    let zone = mesh.view().zone.clone();
    let plan = preheat::Plan {
        image: parsed,
        platform: Some(Platform::this_node()),
        zones: vec![zone.clone()],
        timeout: TIMEOUT,
        pin: false,
        replicas: 1,
    };
    let tx = super::unheard();
    let started = Instant::now();
    match preheat::run(st, mesh, &plan, &tx).await {
        Ok(s) if s.zones.iter().all(|z| z.failure.is_empty()) => {
            tracing::info!(
                image,
                zone,
                seconds = started.elapsed().as_secs_f64(),
                bytes = s.bytes,
                "rollout: prefetched"
            );
        }
        Ok(s) => {
            let why = s.zones.iter().map(|z| z.failure.as_str()).collect::<Vec<_>>().join("; ");
            tracing::warn!(image, zone, reason = %why, "rollout: prefetch failed");
        }
        Err(e) => tracing::warn!(image, zone, error = %e.message(), "rollout: prefetch failed"),
    }
}
