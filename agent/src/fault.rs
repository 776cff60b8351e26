//! Fault injection for the chaos suite, compiled only with the cargo feature `fault-injection` (the chaos crate
//! turns it on; `cargo build -p shoal-agent` and the release image never have it), and inert in release builds
//! even then (a workspace-wide `cargo build --release` unifies the chaos crate's features into the agent). `SHOAL_FAULT=<mode>` makes the
//! node a byzantine peer that tampers with every piece it serves:
//!
//! - `flip`: one byte of the piece flipped, the recorded hash sent (bit rot, a bad disk);
//! - `truncate`: half the bytes, then the stream ends;
//! - `length`: a header that announces another length than asked;
//! - `other-blob`: bytes of something else, with the requested piece's hash (a mixed-up index);
//! - `mixed`: the four above in turn, piece after piece;
//! - `rehash`: a flipped byte with the hash recomputed over it, so the piece check passes, and a piece table
//!   computed over the flipped pieces: a consistent liar (a malicious member that holds the cluster secret), caught
//!   only by another member's table, upstream, or the blob's sha256.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use shoal_proto::peer;

use crate::mesh::Local;
use crate::oci::Digest;
use crate::pieces::{PieceTable, piece_range};

/// How pieces are tampered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceFault {
    /// One byte flipped, the true hash sent.
    Flip,
    /// Half the bytes sent.
    Truncate,
    /// The header announces one byte more than asked.
    Length,
    /// Other bytes of the same length, the true hash sent.
    OtherBlob,
    /// Flip, Truncate, Length, OtherBlob in turn.
    Mixed,
    /// One byte flipped and the hash recomputed over the flipped bytes.
    Rehash,
}

impl PieceFault {
    /// Parses a mode name (see the module documentation).
    pub fn parse(mode: &str) -> Result<Self, String> {
        Ok(match mode {
            "flip" => Self::Flip,
            "truncate" => Self::Truncate,
            "length" => Self::Length,
            "other-blob" => Self::OtherBlob,
            "mixed" => Self::Mixed,
            "rehash" => Self::Rehash,
            _ => return Err(format!("SHOAL_FAULT={mode:?}: one of flip, truncate, length, other-blob, mixed, rehash")),
        })
    }
}

fn configured() -> Option<PieceFault> {
    static FAULT: OnceLock<Option<PieceFault>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let mode = std::env::var("SHOAL_FAULT").ok()?;
        // A release build never tampers, whatever features a workspace-wide build unified into it.
        if !cfg!(debug_assertions) {
            tracing::error!("SHOAL_FAULT is set, but fault injection works in debug builds only: ignored");
            return None;
        }
        match PieceFault::parse(&mode) {
            Ok(f) => {
                tracing::warn!(?f, "FAULT INJECTION: this node tampers with every piece it serves");
                Some(f)
            }
            Err(e) => {
                tracing::error!("{e}; no fault injected");
                None
            }
        }
    })
}

/// The header and bytes this node sends for a piece: as they are, unless `SHOAL_FAULT` says otherwise.
pub fn piece(header: peer::PieceHeader, data: Bytes) -> (peer::PieceHeader, Bytes) {
    match configured() {
        Some(f) => tamper(f, header, data),
        None => (header, data),
    }
}

/// The piece table this node sends: as recorded, except under `rehash`, whose liar is consistent: its table is
/// computed over the bytes it would send, so every piece it serves matches the table it vouches for and only the
/// blob's sha256 (or another member's table) shows the lie.
pub async fn table(local: Arc<dyn Local>, digest: Digest, table: PieceTable) -> PieceTable {
    if configured() != Some(PieceFault::Rehash) {
        return table;
    }
    let mut hashes = Vec::with_capacity(table.hashes.len());
    for i in 0..table.hashes.len() as u64 {
        let (offset, len) = piece_range(table.size, table.piece, i);
        match local.clone().piece(digest.clone(), offset, len as u32, Duration::ZERO).await {
            Ok(p) => hashes.push(*blake3::hash(&flip(&p.data)).as_bytes()),
            Err(_) => return table,
        }
    }
    PieceTable { hashes, ..table }
}

/// The bytes with their middle byte flipped.
fn flip(data: &[u8]) -> Bytes {
    let mut v = data.to_vec();
    if let Some(b) = v.get_mut(data.len() / 2) {
        *b ^= 0xff;
    }
    Bytes::from(v)
}

/// Applies `fault` to one piece.
pub fn tamper(fault: PieceFault, mut header: peer::PieceHeader, data: Bytes) -> (peer::PieceHeader, Bytes) {
    static TURN: AtomicU64 = AtomicU64::new(0);
    let fault = match fault {
        PieceFault::Mixed => [PieceFault::Flip, PieceFault::Truncate, PieceFault::Length, PieceFault::OtherBlob]
            [(TURN.fetch_add(1, Ordering::Relaxed) % 4) as usize],
        f => f,
    };
    let flipped = || flip(&data);
    match fault {
        PieceFault::Flip => (header, flipped()),
        PieceFault::Truncate => (header, data.slice(..data.len() / 2)),
        PieceFault::Length => {
            header.length += 1;
            (header, data)
        }
        PieceFault::OtherBlob => {
            let mut other = vec![0; data.len()];
            blake3::Hasher::new().update(&header.blake3).finalize_xof().fill(&mut other);
            (header, Bytes::from(other))
        }
        // (`Mixed` was turned into one of the four above.)
        PieceFault::Rehash | PieceFault::Mixed => {
            let bad = flipped();
            header.blake3 = blake3::hash(&bad).as_bytes().to_vec();
            (header, bad)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_but_rehash_breaks_the_piece_check() {
        let data = Bytes::from(vec![7u8; 1000]);
        let header =
            || peer::PieceHeader { length: 1000, blake3: blake3::hash(&data).as_bytes().to_vec(), blob_size: 5000 };
        let passes = |(h, d): (peer::PieceHeader, Bytes)| {
            h.length as usize == d.len() && h.length == 1000 && blake3::hash(&d).as_bytes().as_slice() == h.blake3
        };
        for f in [PieceFault::Flip, PieceFault::Truncate, PieceFault::Length, PieceFault::OtherBlob] {
            assert!(!passes(tamper(f, header(), data.clone())), "{f:?}");
        }
        let (h, d) = tamper(PieceFault::Rehash, header(), data.clone());
        assert!(passes((h, d.clone())) && d != data, "rehash passes the piece check with other bytes");
        assert!(PieceFault::parse("bogus").is_err());
    }
}
