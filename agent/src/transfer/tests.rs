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
    let id = PeerId::random();
    let t = Arc::new(Transfer::bind("127.0.0.1:0".parse().unwrap(), id, &secret(s), Duration::from_secs(2)).unwrap());
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
