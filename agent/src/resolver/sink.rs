//! What a download writes into: its partial file, hashed (sha256 of the whole, BLAKE3 per piece) as it is written,
//! with who sent each piece, the piece tables members vouched for, and how much readers may be given; the room it
//! takes in the store.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::download::{Download, Held};
use super::{ResolveError, blocking, lock};
use crate::oci::Digest;
use crate::pieces::{PieceHasher, PieceTable, piece_count, piece_range, piece_size};
use crate::swarm::bitfield::Bitfield;
use crate::swarm::vouch::Sender;
use crate::transfer::VerifiedPiece;

/// Room reserved in the store for a running download; given back when it ends.
pub(super) struct Room {
    pub(super) reserved: Arc<AtomicU64>,
    pub(super) size: u64,
    /// The size at the last free-space check (room taken as bytes arrive).
    pub(super) checked: u64,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.size, Ordering::SeqCst);
    }
}

pub(super) struct Sink<'a> {
    pub(super) dl: &'a Download,
    pub(super) path: PathBuf,
    pub(super) writer: Option<(std::fs::File, Sha256)>,
    pub(super) pieces: Option<PieceHasher>,
    pub(super) written: u64,
    pub(super) size: Option<u64>,
    pub(super) peers_used: HashSet<libp2p::PeerId>,
    /// The room it takes in the store.
    pub(super) room: Room,
    /// Who sent each piece written (`None`: upstream's bytes).
    pub(super) senders: Vec<Option<Sender>>,
    /// The tables members vouched for (see [`vouch`]).
    pub(super) vouchers: Vec<(libp2p::PeerId, PieceTable)>,
    /// The table every piece from a member must match (two members agreed on it, or upstream settled it).
    pub(super) trusted: Option<PieceTable>,
    /// Readers wait for the sha256: the pieces rest on one member's word.
    pub(super) hold: bool,
    /// Pieces written out of order (the exchange): which are there past the prefix, and their hashes. `written`
    /// stays the prefix readers may follow; the sha256 and the piece table advance over it in order.
    pub(super) scattered: Option<Scattered>,
    /// Pieces of the prefix already shared with members.
    shared: usize,
}

/// The pieces of a download written in any order.
pub(super) struct Scattered {
    pub(super) bits: Bitfield,
    hashes: Vec<Option<[u8; 32]>>,
}

/// What a pass over the blob wrote, kept when it is written again from upstream.
pub(super) struct Pass {
    pub(super) senders: Vec<Option<Sender>>,
    pub(super) written: Vec<[u8; 32]>,
    /// The tables members vouched for on that pass (judged once, against upstream's bytes).
    pub(super) vouchers: Vec<(libp2p::PeerId, PieceTable)>,
}

impl<'a> Sink<'a> {
    pub(super) fn new(file: std::fs::File, path: PathBuf, size: Option<u64>, dl: &'a Download, room: Room) -> Self {
        let pieces = size.map(|s| PieceHasher::new(piece_size(s)));
        if let Some(s) = size {
            *lock(&dl.pieces) = Some(Held::new(s, piece_size(s)));
        }
        let writer = Some((file, Sha256::new()));
        Self {
            dl,
            path,
            writer,
            pieces,
            written: 0,
            size,
            peers_used: HashSet::new(),
            room,
            senders: Vec::new(),
            vouchers: Vec::new(),
            trusted: None,
            hold: false,
            scattered: None,
            shared: 0,
        }
    }

    pub(super) fn complete(&self) -> bool {
        self.size.is_some_and(|s| self.written == s)
    }

    /// The sha256 of what is written.
    pub(super) fn digest(&self) -> Digest {
        Digest::from_sha256(
            &self.writer.as_ref().expect("the writer is put back after every batch").1.clone().finalize(),
        )
    }

    /// The piece table of what is written (with a known size).
    pub(super) fn table(&self) -> Option<PieceTable> {
        self.pieces.clone().map(|h| h.finish(self.written))
    }

    /// Starts the blob again from its first byte (the file emptied, readers told), returning what this pass
    /// wrote.
    pub(super) fn restart(&mut self) -> Pass {
        let written = self.table().map(|t| t.hashes).unwrap_or_default();
        let pass =
            Pass { senders: std::mem::take(&mut self.senders), written, vouchers: std::mem::take(&mut self.vouchers) };
        if let Some((file, hasher)) = self.writer.as_mut() {
            *hasher = Sha256::new();
            // Emptied in place: readers that sent nothing yet keep their handle and read the new bytes.
            let _ = file.set_len(0).and_then(|()| io::Seek::seek(file, io::SeekFrom::Start(0)).map(drop));
        }
        self.pieces = self.size.map(|s| PieceHasher::new(piece_size(s)));
        if let Some(s) = self.size {
            *lock(&self.dl.pieces) = Some(Held::new(s, piece_size(s)));
        }
        self.written = 0;
        self.scattered = None;
        self.shared = 0;
        // Upstream's bytes now: streamed as any upstream download's are.
        self.hold = false;
        self.trusted = None;
        self.dl.progress.send_modify(|p| {
            p.written = 0;
            p.released = 0;
            p.restarts += 1;
        });
        pass
    }

    /// Writes a piece whose hash was checked on receipt: its hash goes into the table as is (when it is exactly
    /// the next piece), saving a second BLAKE3 pass.
    pub(super) async fn write_piece(&mut self, piece: VerifiedPiece, sender: Sender) -> Result<(), ResolveError> {
        let len = piece.len();
        self.dl.tally.peers.fetch_add(len, Ordering::Relaxed);
        *lock(&self.dl.tally.by_peer).entry(sender.peer).or_default() += len;
        let aligned = self.pieces.as_mut().is_some_and(|p| p.push_verified(piece.hash, len, self.size));
        if aligned {
            let i = self.pieces.as_ref().map_or(0, |p| p.hashes().len()) - 1;
            self.senders.resize(i + 1, None);
            self.senders[i] = Some(sender);
        }
        self.write_impl(piece.chunks, !aligned, false).await
    }

    /// Hashes and writes a batch of upstream's bytes off the async workers, then tells readers and the piece table.
    pub(super) async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), ResolveError> {
        let n: u64 = batch.iter().map(|b| b.len() as u64).sum();
        self.dl.tally.upstream.fetch_add(n, Ordering::Relaxed);
        self.write_impl(batch, true, true).await
    }

    fn check_wanted(&self) -> Result<(), ResolveError> {
        if self.dl.abandoned(Instant::now()) {
            return Err(ResolveError::Unavailable(format!(
                "abandoned at {} bytes: nobody wanted it for {:?}",
                self.written, self.dl.abandon_after
            )));
        }
        Ok(())
    }

    /// `brought_in`: the bytes come from outside the zone (upstream's).
    async fn write_impl(&mut self, batch: Vec<Bytes>, piece_hash: bool, brought_in: bool) -> Result<(), ResolveError> {
        debug_assert!(self.scattered.is_none(), "a scattered download writes whole pieces (put_piece)");
        self.check_wanted()?;
        let n: u64 = batch.iter().map(|b| b.len() as u64).sum();
        let (mut file, mut hasher) = self.writer.take().expect("the writer is put back after every batch");
        let mut pieces = self.pieces.take();
        let path = self.path.clone();
        let (file, hasher, pieces) = blocking(move || {
            for b in &batch {
                hasher.update(b);
                if let Some(p) = pieces.as_mut().filter(|_| piece_hash) {
                    p.update(b);
                }
                crate::store::write_all(&mut file, b, &path)?;
            }
            Ok((file, hasher, pieces))
        })
        .await?;
        self.writer = Some((file, hasher));
        self.written += n;
        // Members get pieces of a download that holds its readers only once it is verified: a relay of what rests
        // on one member's word would spread it past this node's check.
        self.pieces = pieces;
        self.share_prefix(brought_in);
        self.tell_written();
        Ok(())
    }

    /// Members get pieces of a download that holds its readers only once it is verified: a relay of what rests
    /// on one member's word would spread it past this node's check.
    fn share_prefix(&mut self, brought_in: bool) {
        let Some(p) = self.pieces.as_ref().filter(|_| !self.hold) else { return };
        let mut shared = lock(&self.dl.pieces);
        if let Some(held) = shared.as_mut() {
            for (i, h) in p.hashes().iter().enumerate().skip(self.shared) {
                held.set(i, *h, brought_in);
            }
            self.shared = p.hashes().len();
        }
    }

    fn tell_written(&self) {
        let (written, hold) = (self.written, self.hold);
        self.dl.progress.send_modify(|p| {
            p.written = written;
            if !hold {
                p.released = written;
            }
        });
    }

    /// From now on pieces are written in any order ([`Sink::put_piece`]). With a known size, at a piece boundary.
    pub(super) fn scatter(&mut self) {
        let Some(size) = self.size else { return };
        if self.scattered.is_some() {
            return;
        }
        let piece = piece_size(size);
        let count = piece_count(size, piece);
        let done = self.written / u64::from(piece);
        let mut hashes = vec![None; count as usize];
        for (i, h) in self.pieces.as_ref().map(|p| p.hashes()).unwrap_or_default().iter().enumerate() {
            hashes[i] = Some(*h);
        }
        self.scattered = Some(Scattered { bits: Bitfield::prefix(count, done), hashes });
    }

    /// Which pieces are here (the prefix, or with [`Sink::scatter`], every piece written).
    pub(super) fn have(&self) -> Bitfield {
        match (&self.scattered, self.size) {
            (Some(s), _) => s.bits.clone(),
            (None, Some(size)) => {
                let piece = u64::from(piece_size(size));
                Bitfield::prefix(size.div_ceil(piece), self.written / piece)
            }
            (None, None) => Bitfield::new(0),
        }
    }

    /// The first run of missing pieces, `[first, end)` (scattered).
    pub(super) fn missing_run(&self) -> Option<(u64, u64)> {
        let bits = &self.scattered.as_ref()?.bits;
        let first = (0..bits.len()).find(|i| !bits.get(*i))?;
        let end = (first..bits.len()).find(|i| bits.get(*i)).unwrap_or(bits.len());
        Some((first, end))
    }

    /// Writes piece `i` (its bytes already checked against `hash`: from a member, or hashed from upstream's
    /// bytes) at its offset, scattered. The prefix, the sha256 and the piece table advance over every piece now
    /// contiguous (those written earlier are read back). A piece already here is ignored. `brought_in`: it came
    /// from outside the zone (upstream, or a member of another zone).
    pub(super) async fn put_piece(
        &mut self,
        i: u64,
        chunks: Vec<Bytes>,
        hash: [u8; 32],
        (sender, brought_in): (Option<Sender>, bool),
    ) -> Result<(), ResolveError> {
        self.check_wanted()?;
        let size = self.size.expect("a scattered download has a size");
        let piece = piece_size(size);
        let sc = self.scattered.as_ref().expect("put_piece on a scattered sink");
        if sc.bits.get(i) || i >= sc.bits.len() {
            return Ok(());
        }
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let (offset, expect) = piece_range(size, piece, i);
        if len != expect {
            return Err(ResolveError::Unavailable(format!("piece {i} of {len} bytes, {expect} expected")));
        }
        match &sender {
            Some(s) => {
                self.dl.tally.peers.fetch_add(len, Ordering::Relaxed);
                *lock(&self.dl.tally.by_peer).entry(s.peer).or_default() += len;
                self.senders.resize(self.senders.len().max(i as usize + 1), None);
                self.senders[i as usize] = sender;
            }
            None => {
                self.dl.tally.upstream.fetch_add(len, Ordering::Relaxed);
            }
        }
        // Pieces the prefix now passes over, with their hashes: this one (hashed from memory) and the ones after it
        // written before (read back from the file).
        let mut advance = Vec::new();
        let mut k = self.written / u64::from(piece);
        while k == i || sc.bits.get(k) {
            let h = if k == i { hash } else { sc.hashes[k as usize].expect("a piece written has its hash") };
            advance.push((k, piece_range(size, piece, k), h));
            k += 1;
            if k >= sc.bits.len() {
                break;
            }
        }
        let (file, mut hasher) = self.writer.take().expect("the writer is put back after every batch");
        let mut pieces = self.pieces.take();
        let path = self.path.clone();
        let io_err = |op: &'static str, path: &std::path::Path, source| crate::store::StoreError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let result = blocking(move || {
            use std::os::unix::fs::FileExt as _;
            let mut at = offset;
            for c in &chunks {
                file.write_all_at(c, at).map_err(|e| io_err("write", &path, e))?;
                at += c.len() as u64;
            }
            let mut buf = Vec::new();
            for (k, (off, n), h) in advance {
                if k == i {
                    for c in &chunks {
                        hasher.update(c);
                    }
                } else {
                    buf.resize(n as usize, 0);
                    file.read_exact_at(&mut buf, off).map_err(|e| io_err("read", &path, e))?;
                    hasher.update(&buf);
                }
                if let Some(p) = pieces.as_mut() {
                    p.push_verified(h, n, Some(size));
                }
            }
            Ok((file, hasher, pieces))
        })
        .await?;
        let (file, hasher, pieces) = result;
        self.writer = Some((file, hasher));
        self.pieces = pieces;
        let sc = self.scattered.as_mut().expect("still scattered");
        sc.bits.set(i);
        sc.hashes[i as usize] = Some(hash);
        self.written = (self.pieces.as_ref().map_or(0, |p| p.hashes().len() as u64) * u64::from(piece)).min(size);
        if !self.hold
            && let Some(held) = lock(&self.dl.pieces).as_mut()
        {
            held.set(i as usize, hash, brought_in);
        }
        self.share_prefix(brought_in);
        self.tell_written();
        Ok(())
    }
}

pub(super) struct RemoveOnDrop(pub(super) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use proptest::prelude::*;
    use sha2::Digest as _;

    use super::*;
    use crate::oci::RegistryHost;
    use crate::pieces::MIN_PIECE;
    use crate::resolver::access::Origin;
    use crate::resolver::download::Progress;

    fn download() -> Download {
        let origin = Origin {
            registry: RegistryHost::parse("registry.example").expect("a host"),
            repo_key: "registry.example/app".into(),
            cred: None,
        };
        let (progress, _) = tokio::sync::watch::channel(Progress::starting());
        Download::new(origin, progress, Duration::from_secs(600))
    }

    fn blob(size: u64, seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut out);
        out
    }

    /// Writes `data`'s pieces in `order` into a scattered sink and checks, after each, that the prefix readers
    /// see is exactly the pieces contiguous from the first, that members are offered exactly the pieces written,
    /// and at the end that the sha256, the piece table and the file are the blob's.
    async fn scatter_in(data: &[u8], order: &[u64], hold: bool) {
        let size = data.len() as u64;
        let piece = piece_size(size);
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("partial");
        let file = std::fs::File::options().create_new(true).read(true).write(true).open(&path).expect("a file");
        let dl = download();
        let room = Room { reserved: Arc::new(AtomicU64::new(size)), size, checked: size };
        let mut sink = Sink::new(file, path.clone(), Some(size), &dl, room);
        sink.hold = hold;
        sink.scatter();
        let mut written = Bitfield::new(piece_count(size, piece));
        for &i in order {
            let (offset, len) = piece_range(size, piece, i);
            let bytes = Bytes::copy_from_slice(&data[offset as usize..(offset + len) as usize]);
            let hash = *blake3::hash(&bytes).as_bytes();
            // Split in two chunks, as quinn hands them over.
            let cut = bytes.len() / 3;
            let chunks = vec![bytes.slice(..cut), bytes.slice(cut..)];
            sink.put_piece(i, chunks, hash, (None, true)).await.expect("written");
            written.set(i);
            let prefix = (written.leading() * u64::from(piece)).min(size);
            assert_eq!(sink.written, prefix, "after piece {i}");
            assert_eq!(dl.progress.borrow().written, prefix);
            assert_eq!(dl.progress.borrow().released, if hold { 0 } else { prefix });
            let offered = lock(&dl.pieces).as_ref().expect("a size").bits.clone();
            assert_eq!(offered, if hold { Bitfield::new(written.len()) } else { written.clone() });
            assert_eq!(sink.have(), written);
            // A piece written twice is ignored.
            sink.put_piece(i, vec![Bytes::from_static(b"x")], [0; 32], (None, true)).await.expect("ignored");
        }
        assert!(sink.complete());
        assert_eq!(sink.missing_run(), None);
        let want = Digest::from_sha256(&Sha256::digest(data));
        assert_eq!(sink.digest(), want);
        let mut h = PieceHasher::new(piece);
        h.update(data);
        assert_eq!(sink.table(), Some(h.finish(size)));
        assert_eq!(std::fs::read(&path).expect("read back"), data);
    }

    #[tokio::test]
    async fn pieces_written_out_of_order_make_up_the_blob_and_readers_see_only_the_prefix() {
        // Six pieces, the last one short.
        let data = blob(5 * u64::from(MIN_PIECE) + 1000, 1);
        scatter_in(&data, &[3, 0, 5, 1, 4, 2], false).await;
        // Holding readers (one member's word): nothing is released or offered to members before verification.
        scatter_in(&data, &[5, 4, 3, 2, 1, 0], true).await;
    }

    #[tokio::test]
    async fn missing_runs_and_wrong_lengths() {
        let size = 8 * u64::from(MIN_PIECE);
        let data = blob(size, 2);
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("partial");
        let file = std::fs::File::options().create_new(true).read(true).write(true).open(&path).expect("a file");
        let dl = download();
        let room = Room { reserved: Arc::new(AtomicU64::new(size)), size, checked: size };
        let mut sink = Sink::new(file, path, Some(size), &dl, room);
        sink.scatter();
        let put = |i: u64| {
            let (o, l) = piece_range(size, MIN_PIECE, i);
            let b = Bytes::copy_from_slice(&data[o as usize..(o + l) as usize]);
            let h = *blake3::hash(&b).as_bytes();
            (vec![b], h)
        };
        assert_eq!(sink.missing_run(), Some((0, 8)));
        for i in [0, 1, 4, 7] {
            let (c, h) = put(i);
            sink.put_piece(i, c, h, (None, true)).await.expect("written");
        }
        assert_eq!(sink.missing_run(), Some((2, 4)));
        let (mut c, h) = put(2);
        c[0].truncate(100);
        assert!(sink.put_piece(2, c, h, (None, true)).await.is_err(), "a piece of the wrong length is refused");
        for i in [2, 3] {
            let (c, h) = put(i);
            sink.put_piece(i, c, h, (None, true)).await.expect("written");
        }
        assert_eq!(sink.missing_run(), Some((5, 7)));
        assert_eq!(sink.written, 5 * u64::from(MIN_PIECE));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn any_order_of_pieces_makes_up_the_blob(
            pieces in 1u64..12,
            tail in 0u64..u64::from(MIN_PIECE),
            keys in proptest::collection::vec(any::<u32>(), 12),
            seed in any::<u8>(),
        ) {
            let size = (pieces - 1) * u64::from(MIN_PIECE) + tail.max(1);
            let count = piece_count(size, piece_size(size));
            let mut order: Vec<u64> = (0..count).collect();
            order.sort_by_key(|i| keys[*i as usize % keys.len()] ^ *i as u32);
            let data = blob(size, seed);
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
            rt.block_on(scatter_in(&data, &order, false));
        }
    }
}
