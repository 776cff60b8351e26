//! The transfer endpoint: a quinn (QUIC) endpoint of its own that carries the peer protocol's requests and the
//! pieces' bytes between members.
//!
//! Every bidirectional stream carries one request frame and one response frame (see `proto/peer.proto`), followed
//! for a piece by its raw bytes; a watch of a blob's pieces is answered by a series of frames. A connection is admitted by its first stream, the Hello exchange: each side
//! proves it holds the cluster secret with a MAC over the connection's TLS exporter value (channel binding), so a
//! node without the secret gets no answer, and a relay in the middle cannot reuse a proof on its own TLS session;
//! and signs the same binding with its node key, the key its peer id is derived from, so a member that knows the
//! secret still cannot speak as another member.
//! TLS itself uses throwaway self-signed certificates: the secret, not a PKI, is what authenticates.
//!
//! Input from the other side is bounded before anything is allocated: frames over [`MAX_FRAME`] bytes, pieces over
//! [`crate::pieces::MAX_PIECE`], unknown or malformed messages end in a reset stream (or, before the Hello, a
//! closed connection), never a panic.

mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use libp2p::PeerId;
use prost::Message;
use shoal_proto::peer::{self, Request, Response, error::Code, request, response};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterSecret;
use crate::oci::Digest;
use crate::pieces::MAX_PIECE;

/// Largest frame accepted (an announcement batch is the biggest message).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest Hello frame.
const MAX_HELLO: usize = 1024;
/// Connections awaiting their Hello at once, at most (each may have a little buffered here meanwhile).
const MAX_PENDING: usize = 64;
/// Time a new connection has to complete the Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Stream reset codes.
const RESET_PROTOCOL: u32 = 1;
const RESET_UNAUTHENTICATED: u32 = 2;
/// Exporter label for the channel binding.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-transfer-v1";

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or failed inside a frame.
    #[error("truncated frame: {0}")]
    Truncated(std::io::Error),
    /// The length prefix is over the limit: nothing was allocated for it.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(u64),
    /// Not a valid protobuf message of the expected type.
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Reads one length-prefixed protobuf frame of at most `max` bytes.
pub async fn read_frame<M: Message + Default, R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(FrameError::Truncated)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len as u64));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(FrameError::Truncated)?;
    Ok(M::decode(buf.as_slice())?)
}

/// Encodes one length-prefixed frame.
pub fn encode_frame(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// No authenticated connection could be made.
    #[error("connect: {0}")]
    Connect(String),
    /// No answer, or no next bytes, within the stall timeout.
    #[error("no answer or data within {0:?}")]
    Stall(Duration),
    /// The peer broke the protocol or the stream failed.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer answered with an error.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Its code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// The piece's bytes do not match the hash the peer sent with them.
    #[error("piece does not match its blake3 hash")]
    HashMismatch,
}

/// A piece that matched the hash its holder sent: its bytes as they arrived, and that hash.
#[derive(Debug, Clone)]
pub struct VerifiedPiece {
    /// The bytes, in order.
    pub chunks: Vec<Bytes>,
    /// Their BLAKE3 hash.
    pub hash: [u8; 32],
}

impl VerifiedPiece {
    /// Its length.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len() as u64).sum()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves the streams of authenticated peers.
pub trait Service: Send + Sync + 'static {
    /// Answers one request from `peer` on `send` (the request is already read and decoded).
    fn handle(self: Arc<Self>, peer: PeerId, req: request::Kind, send: quinn::SendStream) -> BoxFuture<'static, ()>;
}

/// The transfer endpoint: server and client sides.
#[derive(Debug)]
pub struct Transfer {
    me: PeerId,
    /// The node key: signs this node's side of each Hello.
    key: libp2p::identity::Keypair,
    endpoint: quinn::Endpoint,
    auth_key: [u8; 32],
    conns: Mutex<HashMap<PeerId, quinn::Connection>>,
    stall: Duration,
}

/// The endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Binding the UDP socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("transfer locks are never poisoned: no code panics while holding one")
}

/// The MAC proving the secret, bound to one TLS session, one role and one peer id.
fn proof(key: &[u8; 32], role: &[u8], exporter: &[u8; 32], peer: &PeerId) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role);
    h.update(exporter);
    h.update(&peer.to_bytes());
    *h.finalize().as_bytes()
}

/// What each side signs with its node key: the role and the channel binding.
fn signed(role: &[u8], exporter: &[u8; 32]) -> Vec<u8> {
    [b"shoal transfer hello v1 ".as_slice(), role, exporter].concat()
}

/// Whether `signature` over `msg` is by the key `peer` was derived from (ed25519 ids carry their public key).
fn signed_by(peer: &PeerId, msg: &[u8], signature: &[u8]) -> bool {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    // The identity multihash (code 0) holds the protobuf-encoded public key itself.
    mh.code() == 0
        && libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).is_ok_and(|k| k.verify(msg, signature))
}

fn proof_matches(expected: &[u8; 32], got: &[u8]) -> bool {
    // blake3::Hash compares in constant time.
    <[u8; 32]>::try_from(got).is_ok_and(|g| blake3::Hash::from_bytes(g) == blake3::Hash::from_bytes(*expected))
}

fn exporter(conn: &quinn::Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"").map_err(|e| format!("exporter: {e:?}"))?;
    Ok(out)
}

impl Transfer {
    /// Binds the endpoint on `addr`.
    pub fn bind(
        addr: SocketAddr,
        key: &libp2p::identity::Keypair,
        secret: &ClusterSecret,
        stall: Duration,
    ) -> Result<Self, TransferError> {
        let me = key.public().to_peer_id();
        let (server, client) = tls::configs().map_err(TransferError::Tls)?;
        let socket = std::net::UdpSocket::bind(addr).map_err(|source| TransferError::Bind { addr, source })?;
        let runtime = quinn::default_runtime().ok_or_else(|| TransferError::Tls("no async runtime".into()))?;
        let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
            .map_err(|source| TransferError::Bind { addr, source })?;
        endpoint.set_default_client_config(client);
        let auth_key = blake3::derive_key("shoal 2026 transfer admission v1", &secret.0);
        Ok(Self { me, key: key.clone(), endpoint, auth_key, conns: Mutex::default(), stall })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until `cancel` fires; each authenticated stream goes to `service`.
    /// At most 64 connections wait for their admission at once; more are refused.
    pub async fn serve(self: Arc<Self>, service: Arc<dyn Service>, tasks: TaskTracker, cancel: CancellationToken) {
        let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => i, None => return },
                () = cancel.cancelled() => return,
            };
            let Ok(admitting) = pending.clone().try_acquire_owned() else {
                tracing::debug!(remote = %incoming.remote_address(), "too many connections awaiting admission: refused");
                incoming.refuse();
                continue;
            };
            let (this, service, t) = (self.clone(), service.clone(), tasks.clone());
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let remote = incoming.remote_address();
                if let Err(e) = this.serve_connection(incoming, service, t, cancel, admitting).await {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                }
            });
        }
    }

    async fn serve_connection(
        &self,
        incoming: quinn::Incoming,
        service: Arc<dyn Service>,
        tasks: TaskTracker,
        cancel: CancellationToken,
        admitting: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), String> {
        let conn = tokio::time::timeout(HELLO_TIMEOUT, incoming)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let peer = match tokio::time::timeout(HELLO_TIMEOUT, self.accept_hello(&conn)).await {
            Ok(Ok(peer)) => {
                // Admitted: the requests it may have open at once (one stream, the Hello, until now).
                conn.set_max_concurrent_bi_streams(tls::MAX_STREAMS.into());
                drop(admitting);
                peer
            }
            Ok(Err(e)) => {
                conn.close(RESET_UNAUTHENTICATED.into(), b"unauthenticated");
                return Err(format!("rejected: {e}"));
            }
            Err(_) => {
                conn.close(RESET_UNAUTHENTICATED.into(), b"no hello");
                return Err("no hello in time".into());
            }
        };
        loop {
            let (send, mut recv) = tokio::select! {
                s = conn.accept_bi() => s.map_err(|e| e.to_string())?,
                () = cancel.cancelled() => return Ok(()),
            };
            let service = service.clone();
            let stall = self.stall;
            tasks.spawn(async move {
                let mut send = send;
                let req = match tokio::time::timeout(stall, read_frame::<Request, _>(&mut recv, MAX_FRAME)).await {
                    Ok(Ok(Request { kind: Some(kind) })) => kind,
                    Ok(Ok(Request { kind: None })) => {
                        tracing::debug!(%peer, "unknown request: stream reset");
                        let _ = send.reset(RESET_PROTOCOL.into());
                        let _ = recv.stop(RESET_PROTOCOL.into());
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bad request frame: stream reset");
                        let _ = send.reset(RESET_PROTOCOL.into());
                        let _ = recv.stop(RESET_PROTOCOL.into());
                        return;
                    }
                    Err(_) => {
                        let _ = send.reset(RESET_PROTOCOL.into());
                        return;
                    }
                };
                if matches!(req, request::Kind::Hello(_)) {
                    let _ = send.reset(RESET_PROTOCOL.into());
                    return;
                }
                service.handle(peer, req, send).await;
            });
        }
    }

    async fn accept_hello(&self, conn: &quinn::Connection) -> Result<PeerId, String> {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: Request = read_frame(&mut recv, MAX_HELLO).await.map_err(|e| e.to_string())?;
        let Some(request::Kind::Hello(hello)) = req.kind else { return Err("first request is not a hello".into()) };
        let peer = PeerId::from_bytes(&hello.peer_id).map_err(|e| format!("peer id: {e}"))?;
        let ex = exporter(conn)?;
        if !proof_matches(&proof(&self.auth_key, b"client", &ex, &peer), &hello.proof) {
            return Err(format!("{peer} does not hold the cluster secret"));
        }
        if !signed_by(&peer, &signed(b"client", &ex), &hello.signature) {
            return Err(format!("the hello is not signed by {peer}'s key: another member's id"));
        }
        let ack = Response {
            kind: Some(response::Kind::Hello(peer::HelloAck {
                peer_id: self.me.to_bytes(),
                proof: proof(&self.auth_key, b"server", &ex, &self.me).to_vec(),
                signature: self.sign(b"server", &ex)?,
            })),
        };
        send.write_all(&encode_frame(&ack)).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok(peer)
    }

    /// This node's signature over its side of a Hello.
    fn sign(&self, role: &[u8], exporter: &[u8; 32]) -> Result<Vec<u8>, String> {
        self.key.sign(&signed(role, exporter)).map_err(|e| format!("signing the hello: {e}"))
    }

    /// An authenticated connection to `peer` at `addr`, reused while it lives.
    async fn connection(&self, peer: PeerId, addr: SocketAddr) -> Result<quinn::Connection, FetchError> {
        if let Some(c) =
            lock(&self.conns).get(&peer).filter(|c| c.close_reason().is_none() && c.remote_address() == addr)
        {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(self.stall, self.connect(peer, addr))
            .await
            .map_err(|_| FetchError::Connect(format!("no connection within {:?}", self.stall)))??;
        lock(&self.conns).insert(peer, conn.clone());
        Ok(conn)
    }

    async fn connect(&self, peer: PeerId, addr: SocketAddr) -> Result<quinn::Connection, FetchError> {
        let err = |e: String| FetchError::Connect(e);
        let conn = self.endpoint.connect(addr, "shoal").map_err(|e| err(e.to_string()))?.await;
        let conn = conn.map_err(|e| err(e.to_string()))?;
        let ex = exporter(&conn).map_err(err)?;
        let hello = Request {
            kind: Some(request::Kind::Hello(peer::Hello {
                peer_id: self.me.to_bytes(),
                proof: proof(&self.auth_key, b"client", &ex, &self.me).to_vec(),
                signature: self.sign(b"client", &ex).map_err(err)?,
            })),
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        send.write_all(&encode_frame(&hello)).await.map_err(|e| err(e.to_string()))?;
        send.finish().map_err(|e| err(e.to_string()))?;
        let resp: Response =
            read_frame(&mut recv, MAX_HELLO).await.map_err(|e| err(format!("hello refused or bad answer: {e}")))?;
        let Some(response::Kind::Hello(ack)) = resp.kind else { return Err(err("answer is not a hello".into())) };
        let theirs = PeerId::from_bytes(&ack.peer_id).map_err(|e| err(format!("peer id: {e}")))?;
        if theirs != peer {
            conn.close(RESET_UNAUTHENTICATED.into(), b"wrong peer");
            return Err(err(format!("{addr} is {theirs}, not {peer}")));
        }
        if !proof_matches(&proof(&self.auth_key, b"server", &ex, &theirs), &ack.proof) {
            conn.close(RESET_UNAUTHENTICATED.into(), b"unauthenticated");
            return Err(err(format!("{peer} does not hold the cluster secret")));
        }
        if !signed_by(&theirs, &signed(b"server", &ex), &ack.signature) {
            conn.close(RESET_UNAUTHENTICATED.into(), b"unauthenticated");
            return Err(err(format!("{addr} answers for {peer} without its key")));
        }
        Ok(conn)
    }

    fn forget(&self, peer: &PeerId) {
        if let Some(c) = lock(&self.conns).remove(peer) {
            c.close(0u32.into(), b"");
        }
    }

    /// Sends one request and reads its answer (announce, locate).
    pub async fn call(&self, peer: PeerId, addr: SocketAddr, req: request::Kind) -> Result<response::Kind, FetchError> {
        self.settle(peer, self.call_impl(peer, addr, req, self.stall).await)
    }

    /// Like [`Transfer::call`], for a request whose answer may take up to `within` (the peer works on it first).
    pub async fn call_within(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        req: request::Kind,
        within: Duration,
    ) -> Result<response::Kind, FetchError> {
        self.settle(peer, self.call_impl(peer, addr, req, within).await)
    }

    /// A connection that stalled or broke the protocol is not reused: the next request connects anew.
    fn settle<T>(&self, peer: PeerId, r: Result<T, FetchError>) -> Result<T, FetchError> {
        if matches!(r, Err(FetchError::Stall(_) | FetchError::Protocol(_))) {
            self.forget(&peer);
        }
        r
    }

    async fn call_impl(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        req: request::Kind,
        stall: Duration,
    ) -> Result<response::Kind, FetchError> {
        let conn = self.connection(peer, addr).await?;
        let fut = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FetchError::Protocol(e.to_string()))?;
            send.write_all(&encode_frame(&Request { kind: Some(req) }))
                .await
                .map_err(|e| FetchError::Protocol(e.to_string()))?;
            let _ = send.finish();
            let resp: Response =
                read_frame(&mut recv, MAX_FRAME).await.map_err(|e| FetchError::Protocol(e.to_string()))?;
            match resp.kind {
                Some(response::Kind::Error(e)) => Err(FetchError::Refused { code: e.code(), message: e.message }),
                Some(k) => Ok(k),
                None => Err(FetchError::Protocol("empty answer".into())),
            }
        };
        tokio::time::timeout(stall, fut).await.map_err(|_| FetchError::Stall(stall))?
    }

    /// Fetches one piece and checks it against the hash sent with it. A partial holder may wait up to `wait` for
    /// the piece before answering (less than the stall timeout: the wait is not a stall).
    pub async fn get_piece(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        digest: &Digest,
        (offset, len): (u64, u32),
        wait: Duration,
    ) -> Result<VerifiedPiece, FetchError> {
        self.settle(peer, self.get_piece_impl(peer, addr, digest, offset, len, wait).await)
    }

    async fn get_piece_impl(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        digest: &Digest,
        offset: u64,
        len: u32,
        wait: Duration,
    ) -> Result<VerifiedPiece, FetchError> {
        if len > MAX_PIECE {
            return Err(FetchError::Protocol(format!("piece of {len} bytes asked for")));
        }
        let conn = self.connection(peer, addr).await?;
        let stall = self.stall;
        let proto = |e: String| FetchError::Protocol(e);
        let req = Request {
            kind: Some(request::Kind::GetPiece(peer::GetPiece {
                digest: digest.to_string(),
                offset,
                length: len,
                wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            })),
        };
        let (mut send, mut recv) = timed(stall, conn.open_bi()).await?.map_err(|e| proto(e.to_string()))?;
        timed(stall, send.write_all(&encode_frame(&req))).await?.map_err(|e| proto(e.to_string()))?;
        let _ = send.finish();
        let header: Response =
            timed(stall + wait, read_frame(&mut recv, MAX_FRAME)).await?.map_err(|e| proto(e.to_string()))?;
        let header = match header.kind {
            Some(response::Kind::Piece(h)) => h,
            Some(response::Kind::Error(e)) => {
                return Err(FetchError::Refused { code: e.code(), message: e.message });
            }
            _ => return Err(proto("answer to a piece request is not a piece".into())),
        };
        if header.length != len {
            return Err(proto(format!("piece of {} bytes sent for {len} asked", header.length)));
        }
        let Ok(expected) = <[u8; 32]>::try_from(header.blake3.as_slice()) else {
            return Err(proto("piece hash is not 32 bytes".into()));
        };
        // Kept as quinn hands the chunks over (no copy into one buffer), hashed as they arrive. The whole piece
        // must arrive within the stall timeout too: a trickle that never pauses is as useless as a stall.
        let body = async {
            let mut chunks = Vec::new();
            let mut got = 0usize;
            let mut hasher = blake3::Hasher::new();
            while got < len as usize {
                let want = len as usize - got;
                match recv.read_chunk(want, true).await.map_err(|e| proto(e.to_string()))? {
                    Some(chunk) => {
                        got += chunk.bytes.len();
                        hasher.update(&chunk.bytes);
                        chunks.push(chunk.bytes);
                    }
                    None => return Err(proto(format!("piece ended after {got} of {len} bytes"))),
                }
            }
            Ok((chunks, hasher))
        };
        let (chunks, hasher) = timed(stall, body).await??;
        if hasher.finalize() != blake3::Hash::from_bytes(expected) {
            return Err(FetchError::HashMismatch);
        }
        Ok(VerifiedPiece { chunks, hash: expected })
    }

    /// Opens a request answered by a series of frames (`WatchPieces`): the stream to read them from, once the
    /// request is sent. Nothing bounds the wait for a frame here (a holder with no new piece says nothing); the
    /// caller reads with [`read_frame`] and drops the stream when done (which stops the sender).
    pub async fn open_series(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        req: request::Kind,
    ) -> Result<quinn::RecvStream, FetchError> {
        let r = async {
            let conn = self.connection(peer, addr).await?;
            let proto = |e: String| FetchError::Protocol(e);
            let (mut send, recv) = timed(self.stall, conn.open_bi()).await?.map_err(|e| proto(e.to_string()))?;
            timed(self.stall, send.write_all(&encode_frame(&Request { kind: Some(req) })))
                .await?
                .map_err(|e| proto(e.to_string()))?;
            let _ = send.finish();
            Ok(recv)
        };
        self.settle(peer, r.await)
    }

    /// Closes every connection and waits (bounded) for the peers to be told.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

async fn timed<T>(stall: Duration, fut: impl Future<Output = T>) -> Result<T, FetchError> {
    tokio::time::timeout(stall, fut).await.map_err(|_| FetchError::Stall(stall))
}

/// Writes a response frame and finishes the stream.
pub async fn respond(send: &mut quinn::SendStream, kind: response::Kind) {
    if send.write_all(&encode_frame(&Response { kind: Some(kind) })).await.is_ok() {
        let _ = send.finish();
    }
}

/// How a piece's write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// All of it, and the stream finished.
    Done,
    /// The peer went away (reset or stopped the stream, closed the connection).
    Gone,
    /// A write made no progress for the stall timeout: the stream was reset (what holds an upload slot is freed).
    Stalled,
}

/// Bytes handed to quinn per write.
const PIECE_CHUNK: usize = 256 << 10;

/// Writes a piece: its header `frame`, then `data` in chunks (slices of the buffer, no copy), `pace` awaited
/// before each chunk (a rate cap) and `sent` told after it. A write that makes no progress for `stall` resets the
/// stream: a member that asks and never reads cannot hold the caller's upload slot.
pub async fn write_piece<F: Future<Output = ()>>(
    send: &mut quinn::SendStream,
    frame: &[u8],
    data: &Bytes,
    stall: Duration,
    mut pace: impl FnMut(usize) -> F,
    mut sent: impl FnMut(u64),
) -> Sent {
    let stalled = |send: &mut quinn::SendStream| {
        let _ = send.reset(0u32.into());
        Sent::Stalled
    };
    match tokio::time::timeout(stall, send.write_all(frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Sent::Gone,
        Err(_) => return stalled(send),
    }
    let mut at = 0;
    while at < data.len() {
        let chunk = data.slice(at..(at + PIECE_CHUNK).min(data.len()));
        at += chunk.len();
        pace(chunk.len()).await;
        let n = chunk.len() as u64;
        match tokio::time::timeout(stall, send.write_chunk(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Sent::Gone,
            Err(_) => return stalled(send),
        }
        sent(n);
    }
    let _ = send.finish();
    Sent::Done
}

/// Writes an error answer.
pub async fn respond_error(send: &mut quinn::SendStream, code: Code, message: impl Into<String>) {
    let e = peer::Error { code: code as i32, message: message.into() };
    respond(send, response::Kind::Error(e)).await;
}

#[cfg(test)]
mod tests;
