//! The boundary between the mesh and the node's content (the resolver): what a member may ask this node for,
//! typed, and the one mapping of refusals to wire codes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use shoal_proto::peer::{self, error::Code};

use crate::oci::{Digest, Kind, RegistryHost, RepoName};
use crate::pieces::PieceTable;
use crate::store::PinRecord;
use crate::swarm::bitfield::Bitfield;

/// A piece read for a peer.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Its bytes.
    pub data: Bytes,
    /// Its hash, as recorded when the bytes were written here.
    pub hash: [u8; 32],
    /// The blob's size.
    pub blob_size: u64,
}

/// Why this node cannot do what a member asked. [`Refusal::code`] is the only mapping to wire codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not held (any more), or nobody usable is known to hold it.
    #[error("not held: {0}")]
    NotFound(String),
    /// Being downloaded; this piece is not there yet.
    #[error("not downloaded yet")]
    NotReady,
    /// The request names something that does not exist (not a piece of this blob, a bad digest).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The upload limit is reached.
    #[error("busy: {0}")]
    Busy(String),
    /// This node could not fetch it for the member (upstream refused or failed, no room): the member asks
    /// upstream itself, which gives its client upstream's own answer.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A local failure.
    #[error("internal: {0}")]
    Internal(String),
}

impl Refusal {
    /// The wire code.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::NotReady => Code::NotReady,
            Self::BadRequest(_) => Code::BadRequest,
            Self::Busy(_) => Code::Busy,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

/// What a member asks a home to fetch on its client's behalf (checked from the wire).
#[derive(Debug, Clone)]
pub struct Order {
    /// The registry the client named.
    pub registry: RegistryHost,
    /// The repository.
    pub repo: RepoName,
    /// Manifest or blob.
    pub kind: Kind,
    /// The client's `Authorization`.
    pub auth: Option<http::HeaderValue>,
    /// The client's `Accept`.
    pub accept: Option<http::HeaderValue>,
    /// A preheat: the asker will not download it (the home fetches it and does not record the asker).
    pub warm: bool,
    /// A preheat's replica: the receiver downloads it into its own store, home or not.
    pub replica: bool,
    /// The asker trades pieces out of order: the home hands it peers in any order of arrival
    /// ([`crate::swarm::directory::HandOut::Exchange`]).
    pub exchange: bool,
}

/// Longest forwarded header value accepted.
const MAX_FORWARDED_HEADER: usize = 8 << 10;

impl Order {
    /// Checks a wire order.
    pub fn from_wire(o: peer::FetchOrder) -> Result<Self, String> {
        let registry = RegistryHost::parse(&o.registry).map_err(|e| format!("registry: {e}"))?;
        let repo = RepoName::parse(&o.repository).map_err(|e| format!("repository: {e}"))?;
        let header = |v: Option<Vec<u8>>, what: &str| -> Result<Option<http::HeaderValue>, String> {
            v.map(|b| {
                if b.len() > MAX_FORWARDED_HEADER {
                    return Err(format!("{what}: longer than {MAX_FORWARDED_HEADER} bytes"));
                }
                let mut v = http::HeaderValue::from_bytes(&b).map_err(|_| format!("{what}: not a header value"))?;
                // Credentials never print (`Debug` of a sensitive value is `Sensitive`).
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()
        };
        Ok(Self {
            registry,
            repo,
            kind: if o.manifest { Kind::Manifest } else { Kind::Blob },
            auth: header(o.authorization, "authorization")?,
            accept: header(o.accept.map(String::into_bytes), "accept")?,
            warm: o.warm,
            replica: o.warm && o.replica,
            exchange: o.exchange,
        })
    }

    /// The wire form.
    pub fn to_wire(&self) -> peer::FetchOrder {
        peer::FetchOrder {
            registry: self.registry.to_string(),
            repository: self.repo.to_string(),
            manifest: self.kind == Kind::Manifest,
            authorization: self.auth.as_ref().map(|a| a.as_bytes().to_vec()),
            accept: self.accept.as_ref().and_then(|a| a.to_str().ok()).map(str::to_owned),
            warm: self.warm,
            replica: self.replica,
            exchange: self.exchange,
        }
    }
}

/// Pin records in one message, at most.
pub const MAX_PINS: usize = 1024;
/// Blobs one pin names, at most.
const MAX_PIN_BLOBS: usize = 4096;
/// The longest image name a pin carries.
const MAX_PIN_IMAGE: usize = 512;

/// Checks a member's pin record: a claim that guides only what this node keeps of what it holds.
pub fn pin_from_wire(p: peer::PinRecord) -> Result<PinRecord, String> {
    if p.image.is_empty() || p.image.len() > MAX_PIN_IMAGE || p.image.chars().any(char::is_control) {
        return Err("pin image: empty, longer than 512 bytes, or with control characters".into());
    }
    if p.blobs.len() > MAX_PIN_BLOBS {
        return Err(format!("pin {}: more than {MAX_PIN_BLOBS} blobs", p.image));
    }
    let digest = Digest::parse(&p.digest).map_err(|e| format!("pin {} digest: {e}", p.image))?;
    let blobs = p
        .blobs
        .iter()
        .map(|b| Digest::parse(b).map_err(|e| format!("pin {} blob: {e}", p.image)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PinRecord { image: p.image, digest, blobs, bytes: p.bytes, pinned: p.pinned, stamp: p.stamp })
}

/// The wire form of a pin record.
pub fn pin_to_wire(p: &PinRecord) -> peer::PinRecord {
    peer::PinRecord {
        image: p.image.clone(),
        digest: p.digest.to_string(),
        blobs: p.blobs.iter().map(ToString::to_string).collect(),
        bytes: p.bytes,
        pinned: p.pinned,
        stamp: p.stamp,
    }
}

/// What a home's own fetch (or copy) of a digest looks like, once its size is known.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Size.
    pub size: u64,
    /// Media type.
    pub media_type: Option<String>,
    /// Held completely already.
    pub complete: bool,
    /// Fetched without credentials.
    pub public: bool,
    /// This call started the download.
    pub started: bool,
}

/// What this node does for members: the content side of the mesh (the resolver implements it).
pub trait Local: Send + Sync + 'static {
    /// Reads piece `[offset, offset + len)` of `digest`, waiting up to `wait` for it if it is being downloaded.
    fn piece(
        self: Arc<Self>,
        digest: Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> BoxFuture<'static, Result<Piece, Refusal>>;

    /// The piece table of `digest`, if this node holds all of it, verified (a download in progress has none to
    /// give).
    fn piece_table(self: Arc<Self>, digest: Digest) -> BoxFuture<'static, Result<PieceTable, Refusal>>;

    /// Which pieces of `digest` this node holds: the whole set now, then again as it gets more (at most every 20
    /// ms), ending after a full set or when its download ends. `asker`, downloading the same blob (for a client
    /// without credentials when `public`), is traded with by this node's download of it, if it trades and has
    /// the same provenance.
    fn watch_pieces(
        self: Arc<Self>,
        digest: Digest,
        asker: libp2p::PeerId,
        public: bool,
    ) -> BoxFuture<'static, Result<futures_util::stream::BoxStream<'static, Bitfield>, Refusal>>;

    /// Merges pin records (the latest stamp per image wins) and returns all of this node's.
    fn merge_pins(self: Arc<Self>, pins: Vec<PinRecord>) -> BoxFuture<'static, Result<Vec<PinRecord>, Refusal>>;

    /// Makes sure this node holds or downloads `digest` (as the home, for the asker's client), and returns once
    /// its size is known.
    fn fetch(self: Arc<Self>, digest: Digest, order: Order) -> BoxFuture<'static, Result<Fetched, Refusal>>;
}

impl std::fmt::Debug for dyn Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Local")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_credentials_never_print() {
        let wire = peer::FetchOrder {
            registry: "registry.example".into(),
            repository: "team/app".into(),
            manifest: false,
            authorization: Some(b"Bearer s3cr3t-token".to_vec()),
            accept: None,
            warm: false,
            replica: false,
            exchange: false,
        };
        let order = Order::from_wire(wire).expect("a valid order");
        let printed = format!("{order:?}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        // And it still goes on the wire as it came.
        assert_eq!(order.to_wire().authorization.as_deref(), Some(&b"Bearer s3cr3t-token"[..]));
    }
}
