//! Framing on hostile input, and the admission handshake over real QUIC on loopback.

use super::*;

async fn read(bytes: &[u8], max: usize) -> Result<Request, FrameError> {
    let mut r = bytes;
    read_frame::<Request, _>(&mut r, max).await
}

#[tokio::test]
async fn frames_round_trip() {
    let req = Request { kind: Some(request::Kind::Locate(peer::Locate { digest: "sha256:00".into(), fetch: None })) };
    assert_eq!(read(&encode_frame(&req), MAX_FRAME).await.unwrap(), req);
}

#[tokio::test]
async fn truncated_frames_are_errors() {
    let req = Request { kind: Some(request::Kind::Locate(peer::Locate { digest: "sha256:00".into(), fetch: None })) };
    let f = encode_frame(&req);
    for cut in 0..f.len() {
        assert!(matches!(read(&f[..cut], MAX_FRAME).await, Err(FrameError::Truncated(_))), "cut at {cut}");
    }
}

#[tokio::test]
async fn absurd_lengths_are_refused_before_allocating() {
    // Claims 4 GiB; only the 4-byte prefix exists. Allocating it would abort the test process.
    let f = u32::MAX.to_be_bytes();
    assert!(matches!(read(&f, MAX_FRAME).await, Err(FrameError::TooLarge(n)) if n == u64::from(u32::MAX)));
    let mut f = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    f.extend(std::iter::repeat_n(0u8, 16));
    assert!(matches!(read(&f, MAX_FRAME).await, Err(FrameError::TooLarge(_))));
}

#[tokio::test]
async fn garbage_and_unknown_messages() {
    // Not protobuf: a field with wire type 7 does not exist.
    let mut f = 2u32.to_be_bytes().to_vec();
    f.extend([0x0f, 0xff]);
    assert!(matches!(read(&f, MAX_FRAME).await, Err(FrameError::Decode(_))));
    // Valid protobuf with an unknown field only: decodes to a request of no known kind.
    let mut f = 3u32.to_be_bytes().to_vec();
    f.extend([0xa0, 0x06, 0x01]); // field 100, varint 1
    assert_eq!(read(&f, MAX_FRAME).await.unwrap(), Request { kind: None });
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _ = rt.block_on(read(&b, 1024));
    }
}

/// A service that answers every locate with an empty answer, and counts requests.
#[derive(Debug, Default)]
struct Counting(std::sync::atomic::AtomicUsize);

impl Service for Counting {
    fn handle(
        self: Arc<Self>,
        _peer: PeerId,
        _req: request::Kind,
        mut send: quinn::SendStream,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            respond(&mut send, response::Kind::Located(peer::Located::default())).await;
        })
    }
}

fn secret(s: &str) -> ClusterSecret {
    ClusterSecret(s.as_bytes().to_vec())
}

fn start(s: &str) -> (Arc<Transfer>, Arc<Counting>, PeerId, SocketAddr, CancellationToken) {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let id = key.public().to_peer_id();
    let t = Arc::new(Transfer::bind("127.0.0.1:0".parse().unwrap(), &key, &secret(s), Duration::from_secs(2)).unwrap());
    let svc = Arc::new(Counting::default());
    let cancel = CancellationToken::new();
    let addr = t.local_addr().unwrap();
    tokio::spawn(t.clone().serve(svc.clone(), TaskTracker::new(), cancel.clone()));
    (t, svc, id, addr, cancel)
}

fn locate() -> request::Kind {
    request::Kind::Locate(peer::Locate { digest: "sha256:00".into(), fetch: None })
}

#[tokio::test]
async fn only_holders_of_the_secret_are_answered() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (server, svc, server_id, addr, _c1) = start("the right cluster secret");
    let (good, _, _, _, _c2) = start("the right cluster secret");
    let (bad, _, bad_id, bad_addr, _c3) = start("a wrong cluster secret!!");
    assert!(matches!(good.call(server_id, addr, locate()).await, Ok(response::Kind::Located(_))));
    assert_eq!(svc.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    let err = bad.call(server_id, addr, locate()).await.unwrap_err();
    assert!(matches!(err, FetchError::Connect(_)), "{err}");
    assert_eq!(svc.0.load(std::sync::atomic::Ordering::SeqCst), 1, "the service never saw the intruder");
    // The client side checks the server too: a server without the secret is not believed.
    let err = good.call(bad_id, bad_addr, locate()).await.unwrap_err();
    assert!(matches!(err, FetchError::Connect(_)), "{err}");
    drop(server);
}

#[tokio::test]
async fn a_connection_that_skips_the_hello_is_closed() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (_server, svc, _, addr, _c) = start("the right cluster secret");
    let (server_cfg, client_cfg) = tls::configs().unwrap();
    drop(server_cfg);
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_cfg);
    let conn = ep.connect(addr, "shoal").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_frame(&Request { kind: Some(locate()) })).await.unwrap();
    send.finish().unwrap();
    let r: Result<Response, _> = read_frame(&mut recv, MAX_FRAME).await;
    assert!(r.is_err(), "a request before the hello gets no answer");
    assert_eq!(svc.0.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn before_its_hello_a_connection_gets_one_stream_and_a_small_window() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (_server, _svc, _, addr, _c) = start("the right cluster secret");
    let (_, client_cfg) = tls::configs().unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_cfg);
    let conn = ep.connect(addr, "shoal").unwrap().await.unwrap();
    // The first stream (where the Hello would go) is allowed; a second is not, until admission.
    let (mut first, _r1) = conn.open_bi().await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(second.is_err(), "an unadmitted connection opened a second stream");
    // On the one stream, 4 MiB of anything but a Hello never all get in (the stream window is a frame and a
    // little, and what is not a Hello closes the connection).
    let pushed = tokio::time::timeout(Duration::from_millis(500), first.write_all(&vec![0u8; 4 << 20])).await;
    assert!(!matches!(pushed, Ok(Ok(()))), "an unadmitted connection pushed 4 MiB into the server");
}

#[tokio::test]
async fn connections_awaiting_admission_are_bounded() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (_server, svc, server_id, addr, _c) = start("the right cluster secret");
    let (_, client_cfg) = tls::configs().unwrap();
    // MAX_PENDING connections that never say hello; the next ones are refused while they wait.
    let mut idle = Vec::new();
    for _ in 0..MAX_PENDING {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(client_cfg.clone());
        let conn = ep.connect(addr, "shoal").unwrap().await.unwrap();
        idle.push((ep, conn));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_cfg.clone());
    let refused = ep.connect(addr, "shoal").unwrap().await;
    assert!(refused.is_err(), "a connection past the admission bound was accepted");
    // Once the idle ones time out (HELLO_TIMEOUT), a member gets in again.
    drop(idle);
    let (member, _, _, _, _c2) = start("the right cluster secret");
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT + Duration::from_secs(3);
    let answered = loop {
        match member.call(server_id, addr, locate()).await {
            Ok(r) => break Some(r),
            Err(_) if tokio::time::Instant::now() < deadline => {}
            Err(_) => break None,
        }
    };
    assert!(matches!(answered, Some(response::Kind::Located(_))), "no member got in after the idle ones timed out");
    assert_eq!(svc.0.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_member_cannot_speak_as_another_member() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let s = "the right cluster secret";
    let (_server, svc, _, addr, _c) = start(s);
    let victim = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
    let attacker = libp2p::identity::Keypair::generate_ed25519();
    let auth_key = blake3::derive_key("shoal 2026 transfer admission v1", &secret(s).0);
    let (_, client_cfg) = tls::configs().unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_cfg);
    let conn = ep.connect(addr, "shoal").unwrap().await.unwrap();
    let ex = exporter(&conn).unwrap();
    // It knows the secret, so its MAC for the victim's id is right; only the node key it lacks gives it away.
    let hello = Request {
        kind: Some(request::Kind::Hello(peer::Hello {
            peer_id: victim.to_bytes(),
            proof: proof(&auth_key, b"client", &ex, &victim).to_vec(),
            signature: attacker.sign(&signed(b"client", &ex)).unwrap(),
        })),
    };
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_frame(&hello)).await.unwrap();
    send.finish().unwrap();
    let r: Result<Response, _> = read_frame(&mut recv, MAX_HELLO).await;
    assert!(r.is_err(), "a hello for another member's id was answered: {r:?}");
    // Nothing it sends afterwards reaches the service.
    if let Ok((mut s2, _)) = conn.open_bi().await {
        let _ = s2.write_all(&encode_frame(&Request { kind: Some(locate()) })).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(svc.0.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Answers every request with a piece far larger than the asker's windows, reporting how the write ended.
#[derive(Debug)]
struct Hoarded(tokio::sync::mpsc::UnboundedSender<(Sent, Duration)>);

impl Service for Hoarded {
    fn handle(
        self: Arc<Self>,
        _peer: PeerId,
        _req: request::Kind,
        mut send: quinn::SendStream,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let data = Bytes::from(vec![7u8; 16 << 20]);
            let frame = encode_frame(&Response {
                kind: Some(response::Kind::Piece(peer::PieceHeader {
                    length: data.len() as u32,
                    blake3: blake3::hash(&data).as_bytes().to_vec(),
                    blob_size: data.len() as u64,
                })),
            });
            let began = std::time::Instant::now();
            let sent = write_piece(&mut send, &frame, &data, Duration::from_secs(1), |_| async {}, |_| {}).await;
            let _ = self.0.send((sent, began.elapsed()));
        })
    }
}

/// A member that asks for a piece and never reads it (keeping the stream open) holds the holder's write, and with
/// it an upload slot, only for the stall timeout: the stream is reset and the slot freed. (Before the timeout the
/// write waited for the reader forever.)
#[tokio::test]
async fn a_member_that_never_reads_holds_an_upload_for_the_stall_timeout_only() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let s = "the right cluster secret";
    let key = libp2p::identity::Keypair::generate_ed25519();
    let server_id = key.public().to_peer_id();
    let server =
        Arc::new(Transfer::bind("127.0.0.1:0".parse().unwrap(), &key, &secret(s), Duration::from_secs(2)).unwrap());
    let addr = server.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    tokio::spawn(server.clone().serve(Arc::new(Hoarded(tx)), TaskTracker::new(), cancel.clone()));
    let (hoarder, _, _, _, _c) = start(s);
    let conn = hoarder.connection(server_id, addr).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_frame(&Request { kind: Some(locate()) })).await.unwrap();
    send.finish().unwrap();
    // Never read: the holder's write fills the windows and stops there.
    let (sent, took) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the holder's write never gave up on a member that does not read")
        .unwrap();
    assert_eq!(sent, Sent::Stalled);
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The asker sees its stream reset once it reads what got through.
    let mut buf = vec![0u8; 1 << 20];
    let mut reset = false;
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await {
        match r {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "the stream was not reset");
    cancel.cancel();
}
