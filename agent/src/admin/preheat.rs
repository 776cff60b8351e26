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
use crate::store::PinRecord;

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
}

pub(super) async fn run(
    st: &AdminState,
    mesh: &Arc<Mesh>,
    plan: &Plan,
    tx: &mpsc::Sender<Result<pb::PreheatEvent, Status>>,
) -> Result<pb::PreheatSummary, Status> {
    let Plan { image, platform, zones, timeout, pin } = plan;
    let (platform, timeout, pin) = (platform.as_ref(), *timeout, *pin);
    let start = Instant::now();
    let (client, root, items) = walk(st, image, platform).await?;
    let total = items.len() as u32;
    let mut results: BTreeMap<String, pb::ZoneResult> = zones
        .iter()
        .map(|z| (z.clone(), pb::ZoneResult { zone: z.clone(), ready: 0, blobs: total, failure: String::new() }))
        .collect();
    let mut orders = Vec::with_capacity(zones.len() * items.len());
    for z in zones {
        orders.extend(items.iter().map(|(d, kind, _)| (z.clone(), d.clone(), *kind)));
    }
    let failures: Vec<(String, String)> = futures_util::stream::iter(orders)
        .map(|(zone, digest, kind)| {
            let order = Order {
                registry: client.registry.clone(),
                repo: client.repo.clone(),
                kind,
                auth: None,
                accept: client.accept.clone(),
                warm: true,
            };
            let resolver = st.resolver.clone();
            async move {
                let failed = match mesh.warm(&zone, &digest, &order, ORDER_WITHIN).await {
                    Ok(Some(_)) => None,
                    // This node is the home there: it fetches the blob itself.
                    Ok(None) => resolver.fetch(digest.clone(), order).await.err().map(|e| e.to_string()),
                    Err(e) => Some(e),
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
            for (d, _, _) in &items {
                if (r.zone == my_zone && here.contains(d)) || mesh.held_in(&r.zone, d).await {
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
