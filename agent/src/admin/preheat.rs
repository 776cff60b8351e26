//! `shoal preheat`: the cluster warmed through the homes. Every blob of the image (its manifests included) is
//! ordered from its home in each zone as a preheat (`Order::warm`: the home fetches it for its zone — from a holder,
//! the home zone's home, or upstream — and does not take the asker for a holder), then each zone is polled until
//! its home knows a complete holder of every blob there.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use shoal_proto::admin as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::pull::{ImageRef, Platform, walk};
use super::{AdminState, blocking};
use crate::mesh::{Local as _, Mesh, Order};
use crate::oci::Digest;
use crate::store::PinRecord;
use libp2p::PeerId;

/// Orders sent at once.
const CONCURRENT_ORDERS: usize = 16;
/// How often the zones are asked how far they got.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How long one order may wait for its home to learn the blob's size.
const ORDER_WITHIN: Duration = Duration::from_secs(60);

/// What to preheat.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) image: ImageRef,
    /// One platform of an index, `None`: all.
    pub(super) platform: Option<Platform>,
    pub(super) zones: Vec<String>,
    pub(super) timeout: Duration,
    /// Pin it once every zone holds it.
    pub(super) pin: bool,
    /// Holders per zone of every blob (the zone's home, then members chosen by rendezvous hashing), at most the
    /// zone's alive members.
    pub(super) replicas: usize,
}

/// Most replicas per zone (a home's locate answer lists 16 holders).
pub(super) const MAX_REPLICAS: usize = crate::swarm::directory::MAX_LOCATED;

/// The `n - 1` members of `zone` besides `digest`'s home there that hold a replica of it: the first by a hash of
/// the image and the member (stable while members stay, spread over the zone across images).
fn replicas_for(mesh: &Mesh, zone: &str, members: &[PeerId], root: &Digest, digest: &Digest, n: usize) -> Vec<PeerId> {
    if n <= 1 {
        return Vec::new();
    }
    let home = mesh.view().home_in(zone, digest);
    let mut members: Vec<(blake3::Hash, PeerId)> = members
        .iter()
        .copied()
        .filter(|p| Some(*p) != home)
        .map(|p| {
            let mut h = blake3::Hasher::new();
            h.update(root.to_string().as_bytes());
            h.update(&p.to_bytes());
            (h.finalize(), p)
        })
        .collect();
    members.sort_by_key(|(h, _)| *h.as_bytes());
    members.into_iter().take(n.saturating_sub(1)).map(|(_, p)| p).collect()
}

pub(super) async fn run(
    st: &AdminState,
    mesh: &Arc<Mesh>,
    plan: &Plan,
    tx: &mpsc::Sender<Result<pb::PreheatEvent, Status>>,
) -> Result<pb::PreheatSummary, Status> {
    let Plan { image, platform, zones, timeout, pin, replicas } = plan;
    let (platform, timeout, pin) = (platform.as_ref(), *timeout, *pin);
    let replicas = (*replicas).clamp(1, MAX_REPLICAS);
    let start = Instant::now();
    let (client, root, items) = walk(st, image, platform).await?;
    let total = items.len() as u32;
    let mut results: BTreeMap<String, pb::ZoneResult> = zones
        .iter()
        .map(|z| (z.clone(), pb::ZoneResult { zone: z.clone(), ready: 0, blobs: total, failure: String::new() }))
        .collect();
    // Each zone's home first (the zone's one download), then the replicas (which download through that home).
    let mut orders = Vec::with_capacity(zones.len() * items.len() * replicas);
    for z in zones {
        orders.extend(items.iter().map(|(d, kind, _)| (z.clone(), d.clone(), *kind, None)));
    }
    // How many holders each zone is to have: the zone's alive members at most.
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for z in zones {
        let members = mesh.alive_in(z);
        want.insert(z.clone(), replicas.min(members.len()).max(1));
        for (d, kind, _) in &items {
            let chosen = replicas_for(mesh, z, &members, &root, d, replicas);
            orders.extend(chosen.into_iter().map(|p| (z.clone(), d.clone(), *kind, Some(p))));
        }
    }
    let me = mesh.view().me;
    let failures: Vec<(String, String)> = futures_util::stream::iter(orders)
        .map(|(zone, digest, kind, replica)| {
            let order = Order {
                registry: client.registry.clone(),
                repo: client.repo.clone(),
                kind,
                auth: None,
                accept: client.accept.clone(),
                warm: true,
                replica: false,
                exchange: false,
            };
            let resolver = st.resolver.clone();
            async move {
                let failed = match replica {
                    // This node holds a replica: it fetches the blob itself.
                    Some(p) if p == me => resolver.fetch(digest.clone(), order).await.err().map(|e| e.to_string()),
                    Some(p) => mesh.replicate(p, &digest, &order, ORDER_WITHIN).await.err(),
                    None => match mesh.warm(&zone, &digest, &order, ORDER_WITHIN).await {
                        Ok(Some(_)) => None,
                        // This node is the home there: it fetches the blob itself.
                        Ok(None) => resolver.fetch(digest.clone(), order).await.err().map(|e| e.to_string()),
                        Err(e) => Some(e),
                    },
                };
                failed.map(|why| (zone, format!("{digest}: {why}")))
            }
        })
        .buffer_unordered(CONCURRENT_ORDERS)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    for (zone, why) in failures {
        let r = results.get_mut(&zone).expect("a zone ordered");
        if r.failure.is_empty() {
            r.failure = why;
        }
    }
    let deadline = start + timeout;
    loop {
        let mut pending = false;
        // What this node holds itself (its zone's homes are not asked about its own copies).
        let store = st.resolver.store().clone();
        let digests: Vec<_> = items.iter().map(|(d, _, _)| d.clone()).collect();
        let here: HashSet<_> = blocking(move || {
            let mut held = HashSet::new();
            for d in digests {
                if store.blob(&d)?.is_some() {
                    held.insert(d);
                }
            }
            Ok(held)
        })
        .await?;
        let my_zone = mesh.view().zone.clone();
        for r in results.values_mut().filter(|r| r.failure.is_empty()) {
            let mut ready = 0;
            let need = want.get(&r.zone).copied().unwrap_or(1);
            for (d, _, _) in &items {
                let mine = usize::from(r.zone == my_zone && here.contains(d));
                if mine >= need || mine + mesh.holders_in(&r.zone, d).await >= need {
                    ready += 1;
                }
            }
            if ready != r.ready {
                r.ready = ready;
                let _ =
                    tx.send(Ok(pb::PreheatEvent { event: Some(pb::preheat_event::Event::Progress(r.clone())) })).await;
            }
            pending |= ready < total;
        }
        if !pending {
            break;
        }
        if Instant::now() >= deadline {
            for r in results.values_mut().filter(|r| r.failure.is_empty() && r.ready < total) {
                r.failure = format!("timed out after {timeout:?} with {} of {} blobs held in the zone", r.ready, total);
            }
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let bytes = items.iter().map(|(_, _, s)| s).sum();
    let all_ready = results.values().all(|r| r.failure.is_empty());
    let (pinned, members_told) = if pin && all_ready {
        let rec = PinRecord {
            image: image.to_string(),
            digest: root.clone(),
            blobs: items.iter().map(|(d, _, _)| d.clone()).collect(),
            bytes,
            pinned: true,
            stamp: super::pins::now_ms(),
        };
        let store = st.resolver.store().clone();
        let r = rec.clone();
        blocking(move || store.put_pin(&r)).await?;
        (true, mesh.tell_pins(vec![rec]).await.0)
    } else {
        (false, 0)
    };
    Ok(pb::PreheatSummary {
        digest: root.to_string(),
        blobs: total,
        bytes,
        zones: results.into_values().collect(),
        seconds: start.elapsed().as_secs_f64(),
        pinned,
        members_told,
    })
}
