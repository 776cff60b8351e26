//! Serving peers: pieces of what this node holds or is downloading, and the home's fetches on a member's behalf,
//! through the mesh's [`Local`] boundary.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::download::{Download, Progress, State};
use super::{Client, Kind, ResolveError, Resolver, blocking, lock};
use crate::containerd::ContainerdError;
use crate::mesh::{Fetched, Local, Order, Piece, Refusal};
use crate::oci::Digest;
use crate::pieces::{PieceHasher, PieceTable, piece_count, piece_index, piece_size};
use crate::store::StoreError;
use crate::swarm::bitfield::Bitfield;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;

impl Resolver {
    /// Reads a piece of a stored blob, containerd's copy, or a running download, with the hash recorded when it
    /// was written.
    async fn read_piece(
        self: Arc<Self>,
        digest: Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> Result<Piece, Refusal> {
        let internal = |e: ResolveError| Refusal::Internal(e.to_string());
        let _guard = self.guard(&digest);
        let store = self.store.clone();
        let d = digest.clone();
        if let Some(meta) = blocking(move || store.blob(&d)).await.map_err(internal)? {
            let store = self.store.clone();
            let d = digest.clone();
            let size = meta.size;
            let table = blocking(move || stored_table(&store, &d, size)).await.map_err(internal)?;
            let hash = table
                .hash_of(offset, u64::from(len))
                .ok_or_else(|| Refusal::BadRequest(format!("[{offset}, +{len}) is not a piece")))?;
            let data = read_range(self.store.blob_path(&digest), None, offset, len).await?;
            return Ok(Piece { data, hash, blob_size: meta.size });
        }
        if let Some(c) = &self.containerd
            && let Some(size) = c.readable(&digest)
        {
            let refusal = |e: ContainerdError| match e {
                ContainerdError::NotFound(_) => Refusal::NotFound("containerd no longer holds it".into()),
                e => Refusal::Internal(e.to_string()),
            };
            let table = c.piece_table(&digest).await.map_err(refusal)?;
            let hash = table
                .hash_of(offset, u64::from(len))
                .ok_or_else(|| Refusal::BadRequest(format!("[{offset}, +{len}) is not a piece")))?;
            let data = c.read_range(&digest, size, offset, u64::from(len)).await.map_err(refusal)?;
            return Ok(Piece { data, hash, blob_size: size });
        }
        let dl = lock(&self.downloads).get(&digest).cloned().ok_or(Refusal::NotFound("not held".into()))?;
        dl.wanted();
        // The piece's hash, once it is written (waiting up to `wait` for it).
        let ready = |p: &Progress| -> Result<Option<(PathBuf, u64, [u8; 32])>, Refusal> {
            if let State::Failed(_) = p.state {
                return Err(Refusal::NotFound("not held".into()));
            }
            let (Some(partial), Some((Some(size), _))) = (&p.partial, &p.header) else { return Ok(None) };
            let pieces = lock(&dl.pieces);
            let Some(held) = pieces.as_ref() else { return Ok(None) };
            let i = piece_index(*size, held.piece, offset, u64::from(len))
                .ok_or_else(|| Refusal::BadRequest(format!("[{offset}, +{len}) is not a piece")))?;
            Ok(held.hashes.get(i).copied().flatten().map(|h| (partial.clone(), *size, h)))
        };
        let mut rx = dl.progress.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                let p = rx.borrow_and_update().clone();
                if let Some(r) = ready(&p)? {
                    return Ok(Some(r));
                }
                // Done or gone: the committed copy (or nothing) is all there is.
                if !matches!(p.state, State::Running) || rx.changed().await.is_err() {
                    return ready(&rx.borrow().clone());
                }
            }
        })
        .await;
        let (partial, size, hash) = match found {
            Ok(r) => r?.ok_or(Refusal::NotReady)?,
            Err(_) => ready(&dl.progress.borrow().clone())?.ok_or(Refusal::NotReady)?,
        };
        let data = read_range(partial, Some(self.store.blob_path(&digest)), offset, len).await?;
        Ok(Piece { data, hash, blob_size: size })
    }
}

/// Least time between two piece sets sent to a watcher: a download writing many pieces a second sends one set
/// per batch.
const WATCH_BATCH: Duration = Duration::from_millis(20);

impl Resolver {
    /// Which pieces of `digest` this node holds, as they arrive ([`Local::watch_pieces`]).
    async fn watch(
        self: Arc<Self>,
        digest: Digest,
        asker: libp2p::PeerId,
        public: bool,
    ) -> Result<BoxStream<'static, Bitfield>, Refusal> {
        let internal = |e: ResolveError| Refusal::Internal(e.to_string());
        let store = self.store.clone();
        let d = digest.clone();
        let whole = match blocking(move || store.blob(&d)).await.map_err(internal)? {
            Some(meta) => Some(meta.size),
            None => self.containerd.as_ref().and_then(|c| c.readable(&digest)),
        };
        if let Some(size) = whole {
            let all = Bitfield::full(piece_count(size, piece_size(size)));
            return Ok(futures_util::stream::once(async move { all }).boxed());
        }
        let dl = lock(&self.downloads).get(&digest).cloned().ok_or(Refusal::NotFound("not held".into()))?;
        dl.wanted();
        // Trading goes both ways: a member of this zone downloading the same blob, with the same provenance, is a
        // peer of this node's exchange too.
        let same_zone = self.mesh.as_ref().is_some_and(|m| {
            let view = m.view();
            view.zone_of(&asker) == Some(view.zone.as_str())
        });
        if let Some(t) = lock(&dl.traders).as_ref().filter(|t| same_zone && t.public == public) {
            let _ = t.tell.send(asker);
        }
        let rx = dl.progress.subscribe();
        let id = lock(&dl.pieces).as_mut().map_or(0, |h| h.watch(same_zone));
        let watching = Watching { dl, id };
        // State: the watcher, its download's progress, the set last sent (None before the first).
        let sets = futures_util::stream::unfold((watching, rx, None::<Bitfield>), |(w, mut rx, last)| async move {
            if last.as_ref().is_some_and(Bitfield::is_full) {
                return None;
            }
            if last.is_some() {
                tokio::time::sleep(WATCH_BATCH).await;
            }
            loop {
                let state = rx.borrow_and_update().state.clone();
                let now = lock(&w.dl.pieces).as_ref().map(|h| h.bits_for(w.id));
                match (&state, now) {
                    (State::Failed(_), _) => return None,
                    // The first set, or one with more pieces than the last.
                    (_, Some(bits)) if last.as_ref().is_none_or(|l| bits.count() > l.count()) => {
                        return Some((bits.clone(), (w, rx, Some(bits))));
                    }
                    // Done: its committed copy answers from now on.
                    (State::Done, _) => return None,
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        });
        Ok(sets.boxed())
    }
}

/// A member watching a running download's pieces; forgotten by the download when the watch ends.
struct Watching {
    dl: Arc<Download>,
    id: u64,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.dl.pieces).as_mut() {
            h.unwatch(self.id);
        }
    }
}

impl From<ResolveError> for Refusal {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NotFound => Self::NotFound("not found upstream".into()),
            e @ (ResolveError::Unauthorized { .. }
            | ResolveError::Denied
            | ResolveError::Unavailable(_)
            | ResolveError::NoSpace(_)) => Self::Unavailable(e.to_string()),
        }
    }
}

impl Local for Resolver {
    fn merge_pins(
        self: Arc<Self>,
        pins: Vec<crate::store::PinRecord>,
    ) -> futures_util::future::BoxFuture<'static, Result<Vec<crate::store::PinRecord>, Refusal>> {
        Box::pin(async move {
            let store = self.store.clone();
            let (all, unpinned) = blocking(move || {
                let mut unpinned = false;
                for p in &pins {
                    if store.put_pin(p)? {
                        tracing::info!(image = %p.image, pinned = p.pinned, "a member's pin record taken");
                        unpinned |= !p.pinned;
                    }
                }
                Ok((store.list_pins()?, unpinned))
            })
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))?;
            if unpinned {
                self.maybe_gc();
            }
            Ok(all)
        })
    }

    fn piece(
        self: Arc<Self>,
        digest: Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> futures_util::future::BoxFuture<'static, Result<Piece, Refusal>> {
        Box::pin(self.read_piece(digest, offset, len, wait))
    }

    fn watch_pieces(
        self: Arc<Self>,
        digest: Digest,
        asker: libp2p::PeerId,
        public: bool,
    ) -> futures_util::future::BoxFuture<'static, Result<BoxStream<'static, Bitfield>, Refusal>> {
        Box::pin(self.watch(digest, asker, public))
    }

    fn piece_table(
        self: Arc<Self>,
        digest: Digest,
    ) -> futures_util::future::BoxFuture<'static, Result<PieceTable, Refusal>> {
        Box::pin(async move {
            let internal = |e: ResolveError| Refusal::Internal(e.to_string());
            let store = self.store.clone();
            let d = digest.clone();
            if let Some(meta) = blocking(move || store.blob(&d)).await.map_err(internal)? {
                let store = self.store.clone();
                return blocking(move || stored_table(&store, &digest, meta.size)).await.map_err(internal);
            }
            if let Some(c) = &self.containerd
                && c.readable(&digest).is_some()
            {
                return c.piece_table(&digest).await.map(|t| (*t).clone()).map_err(|e| match e {
                    ContainerdError::NotFound(_) => Refusal::NotFound("containerd no longer holds it".into()),
                    e => Refusal::Internal(e.to_string()),
                });
            }
            Err(Refusal::NotFound("not held whole".into()))
        })
    }

    fn fetch(
        self: Arc<Self>,
        digest: Digest,
        order: Order,
    ) -> futures_util::future::BoxFuture<'static, Result<Fetched, Refusal>> {
        Box::pin(async move {
            let client = Client { registry: order.registry, repo: order.repo, auth: order.auth, accept: order.accept };
            Ok(self.fetch_for_peer(&client, &digest, order.kind).await?)
        })
    }
}

/// The order a home needs to fetch for this client; `exchange`: this node trades pieces out of order.
pub(super) fn order(client: &Client, kind: Kind, exchange: bool) -> Order {
    Order {
        registry: client.registry.clone(),
        repo: client.repo.clone(),
        kind,
        auth: client.auth.clone(),
        accept: client.accept.clone(),
        warm: false,
        replica: false,
        exchange,
    }
}
/// Reads `len` bytes at `offset` of `path` (or of `fallback` if `path` was renamed away meanwhile).
async fn read_range(path: PathBuf, fallback: Option<PathBuf>, offset: u64, len: u32) -> Result<Bytes, Refusal> {
    tokio::task::spawn_blocking(move || {
        let mut f = match std::fs::File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && fallback.is_some() => {
                std::fs::File::open(fallback.as_ref().expect("checked"))
            }
            r => r,
        }?;
        io::Seek::seek(&mut f, io::SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(&mut f, u64::from(len)), &mut buf)?;
        if buf.len() < len as usize {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than the piece"));
        }
        Ok::<_, io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| Refusal::Internal(e.to_string()))?
    .map_err(|e| Refusal::Internal(format!("read: {e}")))
}

/// The piece table of a stored blob, as recorded when it was written (committed before piece hashes were
/// recorded: hashed from the verified file once, and kept).
fn stored_table(store: &crate::store::Store, digest: &Digest, size: u64) -> Result<PieceTable, StoreError> {
    match store.pieces(digest)? {
        Some(t) => Ok(t),
        None => {
            let t = hash_file(&store.blob_path(digest), size)?;
            store.put_pieces(digest, &t)?;
            Ok(t)
        }
    }
}

/// Computes the piece table of a stored file.
fn hash_file(path: &std::path::Path, size: u64) -> Result<PieceTable, StoreError> {
    let io_err = |source| StoreError::Io { op: "read", path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io_err)?;
    let mut h = PieceHasher::new(piece_size(size));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io::Read::read(&mut f, &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish(size))
}
