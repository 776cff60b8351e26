//! Response bodies: one reader per source (the store's file, containerd's content, a download's partial file as it
//! grows, upstream's body passed through), all with one rule: a client never gets the last byte of content that has
//! not matched its digest yet ([`sendable`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::InUse;
use super::download::{Progress, State, Tally};
use crate::containerd::{Containerd, ContentReader};
use crate::metrics::{Metrics, Source, SourceLabels};
use crate::oci::Digest;

/// Read size when serving a stored blob: large reads halve the per-chunk overhead (measured: 2 MiB served a
/// cached 1 GiB blob ~25 % faster than 512 KiB), at one such buffer per active response.
const STORED_CHUNK: usize = 2 << 20;
/// Read size when following a download: smaller, so bytes reach the client as they arrive (measured: 2 MiB made
/// cold pulls ~5–10 % slower than 512 KiB).
const STREAM_CHUNK: usize = 512 << 10;

/// Bytes read from files for responses and not yet written to clients, at most, across all responses. A client
/// that reads nothing holds its chunk until the server's stall timeout closes its connection; when the budget runs
/// short, responses continue in small chunks (and wait for room), so stalled clients cannot grow memory.
pub const RESPONSE_BUFFERS: usize = 64 << 20;
/// Chunk size when the budget cannot give a full chunk at once.
const SMALL_CHUNK: usize = 64 << 10;
/// Budget permits are KiB.
const UNIT: usize = 1 << 10;

/// The budget of response buffers, shared by every response.
#[derive(Debug, Clone)]
pub struct ResponseBudget(Arc<Semaphore>);

impl ResponseBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes / UNIT)))
    }

    /// Room for a chunk of up to `want` bytes: all of it if the budget has it now, else a small chunk, waiting for
    /// room. Returns the chunk size granted.
    async fn take(&self, want: usize) -> (usize, OwnedSemaphorePermit) {
        let units = |n: usize| n.div_ceil(UNIT).max(1) as u32;
        if let Ok(p) = self.0.clone().try_acquire_many_owned(units(want)) {
            return (want, p);
        }
        let small = want.min(SMALL_CHUNK);
        let p = self.0.clone().acquire_many_owned(units(small)).await.expect("the budget semaphore is never closed");
        (small, p)
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.0.available_permits() * UNIT
    }
}

/// A response chunk holding its share of the budget.
struct Budgeted {
    buf: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// A manifest or blob ready to be streamed.
#[derive(Debug)]
pub struct Opened {
    /// Its digest.
    pub digest: Digest,
    /// Size, if known (always, except for a download whose upstream sent no length).
    pub size: Option<u64>,
    /// Media type as upstream gave it.
    pub media_type: Option<String>,
    pub(super) source: OpenedSource,
    pub(super) _guard: InUse,
}

#[derive(Debug)]
pub(super) enum OpenedSource {
    /// Headers only (a HEAD answered by upstream).
    HeadOnly,
    Stored(PathBuf),
    /// In the node's containerd.
    Containerd(Arc<Containerd>),
    InFlight {
        rx: watch::Receiver<Progress>,
        final_path: PathBuf,
        tally: Arc<Tally>,
    },
    /// Straight from upstream, not cached (no room in the store).
    PassThrough(Box<PassThrough>),
}

/// An upstream body streamed to one client without being cached.
pub(super) struct PassThrough {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    hasher: Sha256,
    /// Bytes of the body read so far.
    read: u64,
    /// The last bytes of the client's range, held back until the whole body matched the digest.
    held: Option<Bytes>,
}

impl std::fmt::Debug for PassThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassThrough").field("read", &self.read).finish_non_exhaustive()
    }
}

impl PassThrough {
    /// Passes `body` through, checked as it goes.
    pub(super) fn new(body: impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Send + 'static) -> Self {
        Self { body: Box::pin(body), hasher: Sha256::new(), read: 0, held: None }
    }

    /// The next bytes of `[*pos, end)`. The whole body is read and hashed (a range too: only the whole can be
    /// checked); the range's last bytes go out only once the body matched `digest`.
    async fn next(&mut self, digest: &Digest, pos: &mut u64, end: u64) -> io::Result<Option<Bytes>> {
        loop {
            match self.body.next().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(io::Error::other)?;
                    let at = self.read;
                    self.hasher.update(&chunk);
                    self.read += chunk.len() as u64;
                    let (lo, hi) = ((*pos).max(at), end.min(self.read));
                    if lo < hi {
                        let part = chunk.slice((lo - at) as usize..(hi - at) as usize);
                        if let Some(out) = self.held.replace(part) {
                            *pos += out.len() as u64;
                            return Ok(Some(out));
                        }
                    }
                }
                None => {
                    let Some(out) = self.held.take() else { return Ok(None) };
                    let got = Digest::from_sha256(&self.hasher.clone().finalize());
                    if got != *digest {
                        return Err(io::Error::other(format!("upstream sent content that hashes to {got}")));
                    }
                    *pos += out.len() as u64;
                    return Ok(Some(out));
                }
            }
        }
    }
}

/// How far a response may go, of a range ending at `end` (exclusive), in content of `size` (if known) of which
/// `written` bytes exist so far: everything once the content matched its digest; before that, never the range's
/// last byte (nor, with no size known, the last byte written), so no response, full or ranged, completes before the
/// content is verified — a client of content that fails verification always sees its response cut short.
pub(super) fn sendable(written: u64, verified: bool, size: Option<u64>, end: u64) -> u64 {
    if verified {
        return written.min(end);
    }
    let last = match size {
        Some(size) => size.min(end),
        None => written.min(end),
    };
    written.min(last.saturating_sub(1))
}

/// Where an opened blob's bytes come from, as `shoal pull` reports it.
#[derive(Debug, Clone)]
pub enum Served {
    /// This node's store.
    Store,
    /// This node's containerd.
    Containerd,
    /// A download on this node: what it received from members and from upstream (read when it is done).
    Download(Arc<Tally>),
    /// Straight from upstream, not kept.
    PassThrough,
}

impl Opened {
    /// Where its bytes come from.
    pub fn served(&self) -> Served {
        match &self.source {
            OpenedSource::HeadOnly | OpenedSource::Stored(_) => Served::Store,
            OpenedSource::Containerd(_) => Served::Containerd,
            OpenedSource::InFlight { tally, .. } => Served::Download(tally.clone()),
            OpenedSource::PassThrough(_) => Served::PassThrough,
        }
    }

    /// Streams bytes `[start, end)`. A download's bytes are sent as they arrive, but never its last byte before
    /// the download was verified; if it fails, the stream ends with an error.
    /// Chunks read from files come out of `budget` (see [`ResponseBudget`]).
    pub fn stream(
        self,
        start: u64,
        end: u64,
        metrics: &Metrics,
        budget: &ResponseBudget,
    ) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        let source = match &self.source {
            OpenedSource::Stored(_) | OpenedSource::HeadOnly => Source::store,
            OpenedSource::InFlight { .. } => Source::download,
            OpenedSource::Containerd(_) => Source::containerd,
            OpenedSource::PassThrough(_) => Source::passthrough,
        };
        let counter = metrics.mirror.bytes_served.get_or_create(&SourceLabels { source }).clone();
        let reader = Reader {
            opened: self,
            file: None,
            remote: None,
            pos: start,
            start,
            end,
            pass: None,
            budget: budget.clone(),
        };
        futures_util::stream::unfold(reader, move |mut r| {
            let counter = counter.clone();
            async move {
                match r.next_chunk().await {
                    Ok(None) => None,
                    Ok(Some(b)) => {
                        counter.inc_by(b.len() as u64);
                        Some((Ok(b), r))
                    }
                    Err(e) => {
                        // End the stream after the error.
                        r.pos = r.end;
                        Some((Err(e), r))
                    }
                }
            }
        })
    }
}

struct Reader {
    opened: Opened,
    file: Option<Arc<std::fs::File>>,
    remote: Option<ContentReader>,
    pos: u64,
    /// Where the response started.
    start: u64,
    end: u64,
    /// The download's pass this reader follows ([`Progress::restarts`]).
    pass: Option<u32>,
    budget: ResponseBudget,
}

impl Reader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let (avail, path) = match &mut self.opened.source {
            OpenedSource::HeadOnly => return Ok(None),
            OpenedSource::PassThrough(body) => return body.next(&self.opened.digest, &mut self.pos, self.end).await,
            OpenedSource::Containerd(c) => {
                if self.remote.is_none() {
                    let size = self.opened.size.unwrap_or(self.end);
                    let r = c.read(&self.opened.digest, size, self.pos, self.end).await.map_err(io::Error::other)?;
                    self.remote = Some(r);
                }
                let r = self.remote.as_mut().expect("opened just above");
                let chunk = r.next().await.map_err(io::Error::other)?;
                if let Some(b) = &chunk {
                    self.pos += b.len() as u64;
                }
                return Ok(chunk);
            }
            OpenedSource::Stored(path) => (self.end, path.clone()),
            OpenedSource::InFlight { rx, final_path, .. } => loop {
                let p = rx.borrow_and_update().clone();
                // The download started again from upstream (members' bytes did not match the digest): bytes sent
                // cannot be taken back; a reader that sent none reads the new pass.
                if self.pass.is_some_and(|pass| pass != p.restarts) {
                    if self.pos > self.start {
                        return Err(io::Error::other("the bytes sent did not match the digest; fetching again"));
                    }
                    self.file = None;
                }
                self.pass = Some(p.restarts);
                let verified = match &p.state {
                    State::Failed(e) => return Err(io::Error::other(e.to_string())),
                    // The commit follows verification.
                    State::Done => true,
                    State::Running => p.verified,
                };
                if verified && p.written <= self.pos {
                    return Ok(None);
                }
                let size = p.header.as_ref().and_then(|h| h.0);
                // Before verification, only what the download released (not what one member's word holds back).
                let shown = if verified { p.written } else { p.written.min(p.released) };
                let avail = sendable(shown, verified, size, self.end);
                if avail > self.pos {
                    let path = match (&p.state, p.partial) {
                        (State::Running, Some(partial)) => partial,
                        _ => final_path.clone(),
                    };
                    break (avail.min(self.end), path);
                }
                // A closed channel still has its final state to look at: check it once more before giving up.
                if rx.changed().await.is_err() && matches!(rx.borrow().state, State::Running) {
                    return Err(io::Error::other("download vanished"));
                }
            },
        };
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let fallback = match &self.opened.source {
                    OpenedSource::InFlight { final_path, .. } if *final_path != path => Some(final_path.clone()),
                    _ => None,
                };
                let start = self.pos;
                let f = tokio::task::spawn_blocking(move || {
                    let mut f = match std::fs::File::open(&path) {
                        // The partial was renamed into the store between the progress update and this open: the
                        // committed blob is the same bytes. (A failed download's partial is gone too; then this
                        // fails.)
                        Err(e) if e.kind() == io::ErrorKind::NotFound => match fallback {
                            Some(p) => std::fs::File::open(p),
                            None => Err(e),
                        },
                        r => r,
                    }?;
                    io::Seek::seek(&mut f, io::SeekFrom::Start(start))?;
                    Ok::<_, io::Error>(f)
                })
                .await
                .map_err(io::Error::other)??;
                let f = Arc::new(f);
                self.file = Some(f.clone());
                f
            }
        };
        let max = match self.opened.source {
            OpenedSource::Stored(_) => STORED_CHUNK,
            _ => STREAM_CHUNK,
        };
        let (want, permit) = self.budget.take((avail - self.pos).min(max as u64) as usize).await;
        // Read straight into the buffer that goes to the socket (uninitialised capacity: no zeroing), off the
        // async workers. Each reader has its own file, and one read in flight, so the file offset is its cursor.
        // The buffer gives its share of the budget back when the server has written (and dropped) it.
        let buf = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut buf = Vec::with_capacity(want);
            io::Read::read_to_end(&mut io::Read::take(&*file, want as u64), &mut buf)?;
            if buf.len() < want {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shorter than recorded"));
            }
            Ok(Bytes::from_owner(Budgeted { buf, _permit: permit }))
        })
        .await
        .map_err(io::Error::other)??;
        self.pos += want as u64;
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass_through(chunks: &[&'static [u8]]) -> PassThrough {
        let body = futures_util::stream::iter(chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect::<Vec<_>>());
        PassThrough { body: Box::pin(body), hasher: Sha256::new(), read: 0, held: None }
    }

    async fn drain(p: &mut PassThrough, digest: &Digest, start: u64, end: u64) -> (Vec<u8>, io::Result<()>) {
        let (mut out, mut pos) = (Vec::new(), start);
        loop {
            match p.next(digest, &mut pos, end).await {
                Ok(Some(b)) => out.extend_from_slice(&b),
                Ok(None) => return (out, Ok(())),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    #[tokio::test]
    async fn response_chunks_hold_their_share_of_the_budget_until_dropped() {
        let budget = ResponseBudget::new(4 << 20);
        let (n, p1) = budget.take(2 << 20).await;
        assert_eq!(n, 2 << 20);
        let chunk = Bytes::from_owner(Budgeted { buf: vec![0; n], _permit: p1 });
        let (n, p2) = budget.take(2 << 20).await;
        assert_eq!((n, budget.available()), (2 << 20, 0));
        // No room for a full chunk: a small one, once room comes back.
        let waiting = tokio::spawn({
            let b = budget.clone();
            async move { b.take(2 << 20).await.0 }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "granted room the budget does not have");
        let slice = chunk.slice(0..10);
        drop(chunk);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a slice of a chunk still holds its room");
        drop(slice);
        assert_eq!(waiting.await.expect("granted"), SMALL_CHUNK);
        drop(p2);
    }

    #[test]
    fn no_range_completes_before_verification() {
        let size = Some(1000);
        // A range that ends well before the download's frontier: all but its last byte until verified.
        assert_eq!(sendable(600, false, size, 50), 49);
        assert_eq!(sendable(600, true, size, 50), 50);
        // The whole blob: all but the last byte, then everything.
        assert_eq!(sendable(1000, false, size, 1000), 999);
        assert_eq!(sendable(1000, true, size, 1000), 1000);
        // Behind the frontier: what is written.
        assert_eq!(sendable(10, false, size, 1000), 10);
        // Unknown size: never the last byte written.
        assert_eq!(sendable(10, false, None, u64::MAX), 9);
        assert_eq!(sendable(10, true, None, u64::MAX), 10);
        // Whatever the inputs, an unverified range never reaches its end.
        for written in [0, 1, 49, 50, 51, 999, 1000] {
            for end in [1, 50, 999, 1000] {
                assert!(sendable(written, false, size, end) < end, "written {written}, end {end}");
                assert!(sendable(written, false, None, end) < end);
            }
        }
    }

    #[tokio::test]
    async fn pass_through_serves_ranges_and_withholds_the_end_of_a_mismatch() {
        let chunks: [&'static [u8]; 3] = [b"hello ", b"pass", b"-through"];
        let digest = Digest::from_sha256(&Sha256::digest(b"hello pass-through"));
        let (all, r) = drain(&mut pass_through(&chunks), &digest, 0, 18).await;
        assert_eq!((all.as_slice(), r.is_ok()), (&b"hello pass-through"[..], true));
        let (part, r) = drain(&mut pass_through(&chunks), &digest, 3, 9).await;
        assert_eq!((part.as_slice(), r.is_ok()), (&b"lo pas"[..], true));
        // Other bytes than the digest names: the range's last bytes never go out.
        let wrong = Digest::from_sha256(&Sha256::digest(b"something else"));
        let (sent, r) = drain(&mut pass_through(&chunks), &wrong, 0, 18).await;
        assert!(r.is_err());
        assert_eq!(sent, b"hello pass");
    }
}
