//! `shoal pin` / `unpin`: an image whose blobs GC never evicts. Pinning pulls the image onto this node first (so
//! the pin protects bytes that are there), refuses a pin whose bytes would not fit the store's budget together
//! with those already pinned, and stores the record; the record (or its removal, a tombstone with a later stamp)
//! is then told to every alive member (`Mesh::tell_pins`), and members exchange their records now and then, so a
//! member that was away learns them. On every node a pin only keeps what that node holds: it never makes a node
//! fetch anything, and the latest word (by stamp) wins.

use std::collections::HashSet;

use shoal_proto::admin as pb;
use tonic::Status;

use super::pull::{Counts, ImageRef, Platform, read_blobs, walk};
use super::{AdminState, blocking};
use crate::store::{PinRecord, Store};

/// Milliseconds since the epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn to_pb(store: &Store, r: &PinRecord) -> pb::Pin {
    let held = r.blobs.iter().filter_map(|d| store.blob(d).ok().flatten()).map(|m| m.size).sum();
    pb::Pin {
        image: r.image.clone(),
        digest: r.digest.to_string(),
        blobs: r.blobs.len() as u32,
        bytes: r.bytes,
        pinned: r.pinned,
        stamp: r.stamp,
        held,
    }
}

/// Tells the members, if there is a mesh: (told, alive).
async fn tell(st: &AdminState, rec: PinRecord) -> (u32, u32) {
    match &st.mesh {
        Some(mesh) => mesh.tell_pins(vec![rec]).await,
        None => (0, 0),
    }
}

pub(super) async fn pin(
    st: &AdminState,
    image: &ImageRef,
    platform: Option<&Platform>,
) -> Result<pb::PinReply, Status> {
    let (client, root, items) = walk(st, image, platform).await?;
    let blobs: Vec<_> = items.iter().map(|(d, _, _)| d.clone()).collect();
    // The sizes the image's manifests give (their bytes were checked against their digests).
    let bytes: u64 = items.iter().map(|(_, _, s)| s).sum();
    // The budget: what is pinned already (held here) plus what this image adds.
    let store = st.resolver.store().clone();
    let (pinned, held) = blocking(move || store.pinned()).await?;
    let adds: u64 = items.iter().filter(|(d, _, _)| !pinned.contains(d)).map(|(_, _, s)| s).sum();
    if held + adds > st.budget {
        return Err(Status::failed_precondition(format!(
            "pinning {image} needs {adds} more bytes; {held} bytes are pinned already and the store's budget \
             (gc_high_bytes) is {}: unpin something or raise disk_budget",
            st.budget
        )));
    }
    // Held here first: a pin protects bytes that are on this node.
    read_blobs(st, image, &client, &items, None, &mut Counts::default()).await?;
    let rec = PinRecord { image: image.to_string(), digest: root, blobs, bytes, pinned: true, stamp: now_ms() };
    let store = st.resolver.store().clone();
    let r = rec.clone();
    blocking(move || store.put_pin(&r)).await?;
    tracing::info!(image = %rec.image, bytes = rec.bytes, "pinned");
    let (told, alive) = tell(st, rec.clone()).await;
    let store = st.resolver.store().clone();
    let pin = blocking(move || Ok(to_pb(&store, &rec))).await?;
    Ok(pb::PinReply { pin: Some(pin), members_told: told, members_alive: alive })
}

pub(super) async fn unpin(st: &AdminState, image: &ImageRef) -> Result<pb::PinReply, Status> {
    let key = image.to_string();
    let store = st.resolver.store().clone();
    let k = key.clone();
    let found = blocking(move || Ok(store.list_pins()?.into_iter().find(|p| p.image == k && p.pinned))).await?;
    let Some(mut rec) = found else {
        return Err(Status::not_found(format!("{key} is not pinned (`shoal pins` lists the pins)")));
    };
    rec.pinned = false;
    rec.stamp = now_ms().max(rec.stamp + 1);
    let store = st.resolver.store().clone();
    let r = rec.clone();
    blocking(move || store.put_pin(&r)).await?;
    tracing::info!(image = %rec.image, "unpinned");
    let (told, alive) = tell(st, rec.clone()).await;
    st.resolver.maybe_gc();
    let store = st.resolver.store().clone();
    let pin = blocking(move || Ok(to_pb(&store, &rec))).await?;
    Ok(pb::PinReply { pin: Some(pin), members_told: told, members_alive: alive })
}

pub(super) async fn list(st: &AdminState) -> Result<pb::PinsReply, Status> {
    let store = st.resolver.store().clone();
    let (pins, held) = blocking(move || {
        let mut seen = HashSet::new();
        let pins = store
            .list_pins()?
            .iter()
            .filter(|r| r.pinned && seen.insert(r.image.clone()))
            .map(|r| to_pb(&store, r))
            .collect();
        Ok((pins, store.pinned()?.1))
    })
    .await?;
    Ok(pb::PinsReply { pins, pinned_held: held, budget: st.budget })
}
