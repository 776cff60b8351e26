//! `ImageCache` objects (`shoal.dev/v1alpha1`, namespaced): images the cluster keeps warm, pinned if asked.
//!
//! Every agent follows them (list, then watch). The one agent that is the **home of an object's name** — the home,
//! in its home zone, of the digest of `imagecache/<namespace>/<name>`, as every member computes it from the same
//! view: no leader election — preheats each image into the object's zones (every zone when it names none) through
//! the zones' homes (as `shoal preheat`), pins it cluster-wide when `spec.pin`, and writes the status: per image and
//! zone `Ready`, `Fetching` or `Failed`, with the reason and the time. It does so when the object changes (a new
//! generation), when it becomes the name's home (members came or went), and every [`RESYNC`] (a zone that lost its
//! holders is warmed again). When an object with `pin` is deleted, the name's home unpins its images.
//!
//! `spec.replicas` (1 to 16) is the number of holders per zone (the zone's home, then members chosen by a hash of
//! the image, as `shoal preheat --replicas`). A spec the agent cannot act on is never half-acted on: the status
//! says why and names the field. Not supported yet, and refused that way: `nodeSelector` (name the zones instead)
//! and `imagePullSecrets` (the agent's own registry credentials are used, never a client's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pull::{ImageRef, Platform};
use super::{AdminState, preheat};
use crate::kubernetes::{Follower, list_watch};
use crate::mesh::Mesh;
use crate::oci::{Digest, RegistryHost};

/// The API group.
pub const GROUP: &str = "shoal.dev";
/// The version served.
pub const VERSION: &str = "v1alpha1";
/// The kind.
pub const KIND: &str = "ImageCache";
/// The resource's plural.
pub const PLURAL: &str = "imagecaches";
/// A reconciled object is reconciled again after this long.
pub const RESYNC: Duration = Duration::from_secs(600);
/// How often the agent looks whether an object became its own (members change) or is due.
const TICK: Duration = Duration::from_secs(5);
/// How long one image's preheat may take.
const PREHEAT_TIMEOUT: Duration = Duration::from_secs(600);
/// Images one object may name.
const MAX_IMAGES: usize = 64;

/// The resource, for a dynamic API.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// A spec the agent can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    images: Vec<ImageRef>,
    /// Empty: every zone.
    zones: Vec<String>,
    pin: bool,
    /// Holders per zone.
    replicas: usize,
}

/// Checks an object's `spec`; the error names the field.
fn parse_spec(spec: Option<&Value>, default: Option<&RegistryHost>) -> Result<Spec, String> {
    let Some(spec) = spec.and_then(Value::as_object) else { return Err("spec: missing or not an object".into()) };
    for (key, _) in spec {
        match key.as_str() {
            "images" | "zones" | "pin" | "replicas" => {}
            "nodeSelector" => return Err("spec.nodeSelector: not supported yet (name the zones in spec.zones)".into()),
            "imagePullSecrets" => {
                return Err("spec.imagePullSecrets: not supported yet (the agent uses the registry credentials \
                            configured for it)"
                    .into());
            }
            other => return Err(format!("spec.{other}: unknown field")),
        }
    }
    let images = spec.get("images").and_then(Value::as_array).ok_or("spec.images: missing or not a list")?;
    if images.is_empty() || images.len() > MAX_IMAGES {
        return Err(format!("spec.images: between 1 and {MAX_IMAGES} images"));
    }
    let images = images
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = v.as_str().ok_or_else(|| format!("spec.images[{i}]: not a string"))?;
            ImageRef::parse(s, default).map_err(|e| format!("spec.images[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let zones = match spec.get("zones") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(zs)) => zs
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some(z) if crate::config::valid_zone(z) => Ok(z.to_owned()),
                _ => Err(format!("spec.zones[{i}]: not a zone name")),
            })
            .collect::<Result<Vec<_>, String>>()?,
        Some(_) => return Err("spec.zones: not a list".into()),
    };
    let pin = match spec.get("pin") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("spec.pin: not a boolean".into()),
    };
    let most = preheat::MAX_REPLICAS;
    let replicas = match spec.get("replicas") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..) if n as usize <= most => n as usize,
            _ => return Err(format!("spec.replicas: a number from 1 to {most}")),
        },
    };
    Ok(Spec { images, zones, pin, replicas })
}

/// An object as followed.
#[derive(Debug, Clone)]
struct Object {
    namespace: String,
    name: String,
    generation: i64,
    spec: Result<Spec, String>,
}

impl Object {
    fn from_dynamic(o: &DynamicObject, default: Option<&RegistryHost>) -> Option<Self> {
        Some(Self {
            namespace: o.metadata.namespace.clone()?,
            name: o.metadata.name.clone()?,
            generation: o.metadata.generation.unwrap_or(0),
            spec: parse_spec(o.data.get("spec"), default),
        })
    }

    /// The digest whose home is this object's writer.
    fn key(&self) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest(format!("imagecache/{}/{}", self.namespace, self.name)))
    }
}

#[derive(Debug)]
enum Event {
    Listed(Vec<Object>),
    Applied(Object),
    Deleted(Object),
}

/// Feeds the reconciler from the watch.
struct Feed {
    tx: mpsc::UnboundedSender<Event>,
    default: Option<RegistryHost>,
}

impl Follower<DynamicObject> for Feed {
    fn listed(&mut self, all: Vec<DynamicObject>) {
        let objs = all.iter().filter_map(|o| Object::from_dynamic(o, self.default.as_ref())).collect();
        let _ = self.tx.send(Event::Listed(objs));
    }
    fn applied(&mut self, o: DynamicObject) {
        if let Some(o) = Object::from_dynamic(&o, self.default.as_ref()) {
            let _ = self.tx.send(Event::Applied(o));
        }
    }
    fn deleted(&mut self, o: DynamicObject) {
        if let Some(o) = Object::from_dynamic(&o, self.default.as_ref()) {
            let _ = self.tx.send(Event::Deleted(o));
        }
    }
}

#[derive(Debug)]
struct Known {
    obj: Object,
    /// The generation last reconciled here, and when.
    done: Option<(i64, Instant)>,
}

/// Whether this agent is the home of `obj`'s name.
fn is_home(mesh: &Mesh, obj: &Object) -> bool {
    let view = mesh.view();
    let key = obj.key();
    view.home_in(&view.home_zone(&key), &key) == Some(view.me)
}

/// Follows the `ImageCache` objects and reconciles those whose name is homed here (two tasks on `tasks`), until
/// `cancel`.
pub fn spawn(client: Client, st: Arc<AdminState>, mesh: Arc<Mesh>, tasks: &TaskTracker, cancel: CancellationToken) {
    let (tx, rx) = mpsc::unbounded_channel();
    let feed = Feed { tx, default: st.resolver.upstream().default_registry().cloned() };
    let all = Api::<DynamicObject>::all_with(client.clone(), &api_resource());
    tasks.spawn(list_watch(all, "ImageCaches", feed, cancel.clone()));
    tasks.spawn(follow(client, st, mesh, rx, cancel));
}

async fn follow(
    client: Client,
    st: Arc<AdminState>,
    mesh: Arc<Mesh>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    cancel: CancellationToken,
) {
    let ar = api_resource();
    let mut known: BTreeMap<(String, String), Known> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            ev = rx.recv() => match ev {
                None => break,
                Some(Event::Listed(all)) => {
                    let mut next = BTreeMap::new();
                    for obj in all {
                        let k = (obj.namespace.clone(), obj.name.clone());
                        let done = known.remove(&k).and_then(|old| old.done.filter(|(g, _)| *g == obj.generation));
                        next.insert(k, Known { obj, done });
                    }
                    // Deleted while the watch was down: treated as deletions.
                    for (_, gone) in std::mem::replace(&mut known, next) {
                        deleted(&st, &mesh, &gone.obj).await;
                    }
                }
                Some(Event::Applied(obj)) => {
                    let k = (obj.namespace.clone(), obj.name.clone());
                    let done = known.remove(&k).and_then(|old| old.done.filter(|(g, _)| *g == obj.generation));
                    known.insert(k, Known { obj, done });
                }
                Some(Event::Deleted(obj)) => {
                    known.remove(&(obj.namespace.clone(), obj.name.clone()));
                    deleted(&st, &mesh, &obj).await;
                }
            },
            _ = tick.tick() => {}
        }
        // Objects homed here and due: changed, never done here (the home moved here), or past the resync.
        for k in known.values_mut() {
            if !is_home(&mesh, &k.obj) {
                k.done = None;
                continue;
            }
            if k.done.is_some_and(|(g, at)| g == k.obj.generation && at.elapsed() < RESYNC) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &k.obj.namespace, &ar);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = reconcile(&st, &mesh, &api, &k.obj) => {}
            }
            k.done = Some((k.obj.generation, Instant::now()));
        }
    }
}

/// The status of one image in one zone.
fn zone_status(zone: &str, state: &str, reason: &str) -> Value {
    json!({"zone": zone, "state": state, "reason": reason,
        "time": humantime::format_rfc3339_seconds(SystemTime::now()).to_string()})
}

async fn write_status(api: &Api<DynamicObject>, obj: &Object, status: Value) {
    let patch = Patch::Merge(json!({"status": status}));
    match api.patch_status(&obj.name, &PatchParams::default(), &patch).await {
        Ok(_) => tracing::debug!(namespace = %obj.namespace, name = %obj.name, "image cache status written"),
        Err(e) => tracing::warn!(namespace = %obj.namespace, name = %obj.name, error = %e,
            "cannot write the image cache's status"),
    }
}

/// Preheats (and pins) the object's images, writing the status as each image is done.
async fn reconcile(st: &AdminState, mesh: &Arc<Mesh>, api: &Api<DynamicObject>, obj: &Object) {
    let spec = match &obj.spec {
        Ok(s) => s.clone(),
        Err(why) => {
            tracing::warn!(namespace = %obj.namespace, name = %obj.name, reason = %why, "image cache refused");
            let status = json!({"observedGeneration": obj.generation, "message": why, "images": []});
            return write_status(api, obj, status).await;
        }
    };
    let zones = if spec.zones.is_empty() { mesh.view().zones() } else { spec.zones.clone() };
    let mut images: Vec<Value> = spec
        .images
        .iter()
        .map(|i| {
            json!({"image": i.to_string(), "zones": zones.iter().map(|z| zone_status(z, "Fetching", "")).collect::<Vec<_>>()})
        })
        .collect();
    write_status(api, obj, json!({"observedGeneration": obj.generation, "message": "", "images": images})).await;
    for (i, image) in spec.images.iter().enumerate() {
        let plan = preheat::Plan {
            image: image.clone(),
            platform: Some(Platform::this_node()),
            zones: zones.clone(),
            timeout: PREHEAT_TIMEOUT,
            pin: spec.pin,
            replicas: spec.replicas,
        };
        // Progress events are not followed: the status is written once the image is done.
        let tx = super::unheard();
        let zs: Vec<Value> = match preheat::run(st, mesh, &plan, &tx).await {
            Ok(summary) => {
                images[i]["digest"] = json!(summary.digest);
                images[i]["pinned"] = json!(summary.pinned);
                summary
                    .zones
                    .iter()
                    .map(|z| {
                        if z.failure.is_empty() {
                            zone_status(&z.zone, "Ready", "")
                        } else {
                            zone_status(&z.zone, "Failed", &z.failure)
                        }
                    })
                    .collect()
            }
            Err(e) => zones.iter().map(|z| zone_status(z, "Failed", e.message())).collect(),
        };
        images[i]["zones"] = json!(zs);
        tracing::info!(namespace = %obj.namespace, name = %obj.name, image = %image, "image cache reconciled");
        write_status(api, obj, json!({"observedGeneration": obj.generation, "message": "", "images": images})).await;
    }
}

/// An object is gone: if it pinned, its name's home unpins its images.
async fn deleted(st: &AdminState, mesh: &Mesh, obj: &Object) {
    let Ok(spec) = &obj.spec else { return };
    if !spec.pin || !is_home(mesh, obj) {
        return;
    }
    for image in &spec.images {
        match super::pins::unpin(st, image).await {
            Ok(_) => tracing::info!(namespace = %obj.namespace, name = %obj.name, image = %image,
                "image cache deleted: unpinned"),
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => tracing::warn!(image = %image, error = %e.message(), "image cache deleted: cannot unpin"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> Result<Spec, String> {
        parse_spec(Some(&v), None)
    }

    #[test]
    fn a_spec_is_checked_field_by_field() {
        let s = spec(json!({"images": ["localhost:5000/app:1"], "zones": ["z1"], "pin": true})).expect("valid");
        assert_eq!((s.images.len(), s.zones, s.pin), (1, vec!["z1".to_owned()], true));
        let s = spec(json!({"images": ["localhost:5000/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"], "replicas": 1}))
            .expect("valid");
        assert!(s.zones.is_empty() && !s.pin && s.replicas == 1);
        assert_eq!(spec(json!({"images": ["localhost:5000/a"], "replicas": 3})).map(|s| s.replicas), Ok(3));
        for (bad, field) in [
            (json!({}), "spec.images"),
            (json!({"images": []}), "spec.images"),
            (json!({"images": [7]}), "spec.images[0]"),
            (json!({"images": ["localhost:5000/ok", "UPPER CASE!"]}), "spec.images[1]"),
            (json!({"images": ["localhost:5000/a"], "zones": ["no spaces allowed"]}), "spec.zones[0]"),
            (json!({"images": ["localhost:5000/a"], "pin": "yes"}), "spec.pin"),
            (json!({"images": ["localhost:5000/a"], "replicas": 0}), "spec.replicas"),
            (json!({"images": ["localhost:5000/a"], "replicas": 17}), "spec.replicas"),
            (json!({"images": ["localhost:5000/a"], "nodeSelector": {"a": "b"}}), "spec.nodeSelector"),
            (json!({"images": ["localhost:5000/a"], "imagePullSecrets": [{"name": "s"}]}), "spec.imagePullSecrets"),
            (json!({"images": ["localhost:5000/a"], "colour": "blue"}), "spec.colour"),
        ] {
            let e = spec(bad.clone()).expect_err("refused");
            assert!(e.starts_with(field), "{bad}: {e}");
        }
        assert!(parse_spec(None, None).is_err());
    }
}
