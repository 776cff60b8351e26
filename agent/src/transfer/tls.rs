//! TLS for the transfer endpoint. Certificates are self-signed and thrown away at exit: peers are admitted by the
//! cluster-secret proof bound to the TLS session (see the parent module), so the client accepts any certificate
//! but still checks that the server holds its key (the handshake signature), which the channel binding relies on.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// ALPN of the peer protocol.
const ALPN: &[u8] = b"shoal/1";

/// Accepts any certificate; verifies handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Concurrent requests an admitted member may have open on one connection.
pub(super) const MAX_STREAMS: u32 = 256;
/// Bytes a member may have in flight towards this node on one connection (requests only: an announcement batch is
/// the largest, under a MiB).
const SERVER_RECEIVE_WINDOW: u32 = 2 << 20;
/// Incoming connections not yet accepted, at most.
const MAX_INCOMING: usize = 256;

/// Flow control sized for pieces: a stream carries one piece (at most 2 MiB and its header frame), a connection a
/// downloader's window of them. These bound memory per connection, both ways: a node serving several peers in a
/// burst holds at most `send_window` unacknowledged bytes for each (8-node burst: 24 MiB windows, 88 MiB peak;
/// 4 MiB, 70 MiB; the windows stay far above a LAN's bandwidth-delay product).
///
/// The serving side only ever receives requests (pieces flow the other way), so it takes little: a connection
/// before its Hello may open one stream and have [`SERVER_RECEIVE_WINDOW`] bytes buffered here, and after
/// admission [`MAX_STREAMS`] streams ([`Transfer`](super::Transfer) raises the limit) within the same window.
fn transport(server: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if server {
        t.max_concurrent_bidi_streams(1u32.into());
        t.stream_receive_window((super::MAX_FRAME as u32 + 1024).into());
        t.receive_window(SERVER_RECEIVE_WINDOW.into());
    } else {
        // A client never accepts streams: it only opens them.
        t.max_concurrent_bidi_streams(0u32.into());
        t.stream_receive_window(((2u32 << 20) + (64 << 10)).into());
        t.receive_window((4u32 << 20).into());
    }
    t.max_concurrent_uni_streams(0u32.into());
    t.send_window(4 << 20);
    // Packet size is most of the per-byte cost (a syscall and an AEAD call each): let MTU discovery find the
    // path's real maximum (jumbo frames, loopback) instead of stopping at Ethernet's 1452.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(u16::MAX);
    t.mtu_discovery_config(Some(mtu));
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))));
    Arc::new(t)
}

/// Server and client configurations with a fresh self-signed certificate.
pub(super) fn configs() -> Result<(quinn::ServerConfig, quinn::ClientConfig), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["shoal".to_owned()]).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| e.to_string())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(|e| e.to_string())?;
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|e| e.to_string())?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport(true));
    // Connections waiting for their handshake to be accepted, and what they may have buffered meanwhile.
    server.max_incoming(MAX_INCOMING);
    server.incoming_buffer_size(64 << 10);
    server.incoming_buffer_size_total(MAX_INCOMING as u64 * (64 << 10));
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport(false));
    Ok((server, client))
}
