//! Pieces: the units blobs travel between peers in, each with a BLAKE3 hash.
//!
//! A blob of `size` bytes is cut into pieces of [`piece_size`]`(size)` bytes (the last one shorter). The hashes
//! are computed by [`PieceHasher`] as the bytes are first written on this node (from upstream or from a peer),
//! kept in memory while the download runs and in the store's index once committed, so a holder sends the hash the
//! bytes had when it wrote them: a piece that rotted on its disk fails the receiver's check. Pure bookkeeping, no
//! I/O.

/// Smallest piece: below this the per-piece request costs more than it buys.
pub const MIN_PIECE: u32 = 256 << 10;
/// Largest piece: the receiver buffers whole pieces to check them before writing, a window of them per transfer.
pub const MAX_PIECE: u32 = 2 << 20;
/// Pieces a blob is cut into, about (fewer for small blobs, more only for blobs over 2 GiB).
const TARGET_PIECES: u64 = 1024;

/// The piece size for a blob of `size` bytes: a power of two in `[MIN_PIECE, MAX_PIECE]`, about `size / 1024`.
pub fn piece_size(size: u64) -> u32 {
    let want = (size / TARGET_PIECES).max(1).next_power_of_two();
    want.clamp(u64::from(MIN_PIECE), u64::from(MAX_PIECE)) as u32
}

/// Number of pieces of a blob.
pub fn piece_count(size: u64, piece: u32) -> u64 {
    size.div_ceil(u64::from(piece))
}

/// The piece index of `[offset, offset + len)` if that is exactly one piece of a blob of `size` bytes.
pub fn piece_index(size: u64, piece: u32, offset: u64, len: u64) -> Option<usize> {
    let piece = u64::from(piece);
    if piece == 0 || !offset.is_multiple_of(piece) || offset >= size {
        return None;
    }
    let expect = piece.min(size - offset);
    (len == expect).then(|| (offset / piece) as usize)
}

/// The byte range `(offset, len)` of piece `index`.
pub fn piece_range(size: u64, piece: u32, index: u64) -> (u64, u64) {
    let offset = index * u64::from(piece);
    (offset, u64::from(piece).min(size.saturating_sub(offset)))
}

/// A complete blob's piece hashes, as recorded in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceTable {
    /// Piece size.
    pub piece: u32,
    /// Blob size.
    pub size: u64,
    /// One hash per piece.
    pub hashes: Vec<[u8; 32]>,
}

impl PieceTable {
    /// The binary form: piece size (u32 BE), blob size (u64 BE), then the hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + 32 * self.hashes.len());
        v.extend_from_slice(&self.piece.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        for h in &self.hashes {
            v.extend_from_slice(h);
        }
        v
    }

    /// Parses [`PieceTable::encode`]'s output; `None` for anything inconsistent.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let piece = u32::from_be_bytes(b.get(0..4)?.try_into().ok()?);
        let size = u64::from_be_bytes(b.get(4..12)?.try_into().ok()?);
        let rest = b.get(12..)?;
        if !(MIN_PIECE..=MAX_PIECE).contains(&piece) || !piece.is_power_of_two() {
            return None;
        }
        if rest.len() % 32 != 0 || (rest.len() / 32) as u64 != piece_count(size, piece) {
            return None;
        }
        let hashes = rest.chunks_exact(32).map(|c| c.try_into().expect("chunks of 32")).collect();
        Some(Self { piece, size, hashes })
    }

    /// The hash of the piece at `[offset, offset + len)`, if that is exactly one piece.
    pub fn hash_of(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
        piece_index(self.size, self.piece, offset, len).and_then(|i| self.hashes.get(i).copied())
    }
}

/// Hashes a blob's bytes, fed in any chunking, into per-piece BLAKE3 hashes.
#[derive(Debug, Clone)]
pub struct PieceHasher {
    piece: u32,
    current: blake3::Hasher,
    in_current: u64,
    hashes: Vec<[u8; 32]>,
}

impl PieceHasher {
    /// A hasher for pieces of `piece` bytes.
    pub fn new(piece: u32) -> Self {
        Self { piece, current: blake3::Hasher::new(), in_current: 0, hashes: Vec::new() }
    }

    /// The piece size.
    pub fn piece(&self) -> u32 {
        self.piece
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        let piece = u64::from(self.piece);
        while !data.is_empty() {
            let take = ((piece - self.in_current) as usize).min(data.len());
            self.current.update(&data[..take]);
            self.in_current += take as u64;
            data = &data[take..];
            if self.in_current == piece {
                self.hashes.push(*self.current.finalize().as_bytes());
                self.current.reset();
                self.in_current = 0;
            }
        }
    }

    /// Records the next piece's hash without hashing it (it was checked on receipt), if the hasher is at a piece
    /// boundary and `len` is that piece's full length in a blob of `size` bytes. Returns whether it did; if not,
    /// the bytes must be fed to [`PieceHasher::update`].
    pub fn push_verified(&mut self, hash: [u8; 32], len: u64, size: Option<u64>) -> bool {
        let offset = self.hashes.len() as u64 * u64::from(self.piece);
        let Some(size) = size else { return false };
        if self.in_current != 0 || piece_index(size, self.piece, offset, len).is_none() {
            return false;
        }
        self.hashes.push(hash);
        true
    }

    /// Hashes of the pieces completed so far.
    pub fn hashes(&self) -> &[[u8; 32]] {
        &self.hashes
    }

    /// Ends the blob: the last, shorter piece gets its hash too.
    pub fn finish(mut self, size: u64) -> PieceTable {
        if self.in_current > 0 {
            self.hashes.push(*self.current.finalize().as_bytes());
        }
        PieceTable { piece: self.piece, size, hashes: self.hashes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(piece_size(0), MIN_PIECE);
        assert_eq!(piece_size(10 << 20), MIN_PIECE);
        assert_eq!(piece_size(256 << 20), 256 << 10);
        assert_eq!(piece_size(1 << 30), 1 << 20);
        assert_eq!(piece_size(100 << 30), MAX_PIECE);
    }

    #[test]
    fn verified_pieces_take_their_hash_only_at_a_boundary() {
        let data: Vec<u8> = (0..(MIN_PIECE as usize * 2 + 1000)).map(|i| (i * 7) as u8).collect();
        let size = Some(data.len() as u64);
        let p = MIN_PIECE as usize;
        let mut whole = PieceHasher::new(MIN_PIECE);
        whole.update(&data);
        let expect = whole.finish(data.len() as u64);
        let mut h = PieceHasher::new(MIN_PIECE);
        assert!(h.push_verified(expect.hashes[0], p as u64, size));
        // Not a whole piece, or not at a boundary: refused, the bytes get hashed instead.
        assert!(!h.push_verified(expect.hashes[1], 10, size));
        h.update(&data[p..p + 10]);
        assert!(!h.push_verified(expect.hashes[1], p as u64, size));
        h.update(&data[p + 10..]);
        assert_eq!(h.finish(data.len() as u64), expect);
    }

    proptest! {
        #[test]
        fn hashes_do_not_depend_on_chunking(
            data in proptest::collection::vec(any::<u8>(), 0..700_000),
            cuts in proptest::collection::vec(0usize..700_000, 0..20),
        ) {
            let piece = MIN_PIECE;
            let mut whole = PieceHasher::new(piece);
            whole.update(&data);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut chunked = PieceHasher::new(piece);
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                chunked.update(&data[at..c]);
                at = c;
            }
            let (a, b) = (whole.finish(data.len() as u64), chunked.finish(data.len() as u64));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.hashes.len() as u64, piece_count(data.len() as u64, piece));
            for (i, h) in a.hashes.iter().enumerate() {
                let (off, len) = piece_range(data.len() as u64, piece, i as u64);
                let expect = blake3::hash(&data[off as usize..(off + len) as usize]);
                prop_assert_eq!(h, expect.as_bytes());
                prop_assert_eq!(a.hash_of(off, len), Some(*h));
            }
            prop_assert_eq!(PieceTable::decode(&a.encode()), Some(a));
        }

        #[test]
        fn piece_index_accepts_exactly_the_pieces(size in 0u64..(1 << 40), offset in 0u64..(1 << 40), len in 0u64..(4 << 20)) {
            let piece = piece_size(size);
            match piece_index(size, piece, offset, len) {
                Some(i) => {
                    prop_assert_eq!(piece_range(size, piece, i as u64), (offset, len));
                    prop_assert!(offset + len <= size && len > 0);
                }
                None => {
                    let aligned = offset.is_multiple_of(u64::from(piece)) && offset < size;
                    prop_assert!(!aligned || len != u64::from(piece).min(size - offset));
                }
            }
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PieceTable::decode(&b);
        }
    }
}
