//! The checks behind the fuzz targets (`chaos/fuzz`, run with `cargo fuzz`): everything Shoal parses from
//! outside, fed arbitrary bytes. Each function panics when a property breaks; the fuzz targets call them with
//! libFuzzer's inputs, and `tests/fuzz_corpus.rs` replays the kept corpus and every crash reproducer through them
//! as regression tests.

use prost::Message;
use shoal_agent::config::RawConfig;
use shoal_agent::containerd::children;
use shoal_agent::mesh::{Holding, Order};
use shoal_agent::mirror::{Parsed, parse_path, registry_param};
use shoal_agent::oci::{Digest, RangeSpec, Reference, RegistryHost, RepoName};
use shoal_agent::upstream::challenge;
use shoal_proto::peer::{self, request, response};

/// A target's name and its check.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name of its fuzz binary and corpus directory.
pub const TARGETS: [Target; 7] = [
    ("names", names),
    ("digest", digest),
    ("range", range),
    ("www_authenticate", www_authenticate),
    ("manifest", manifest),
    ("peer_frame", peer_frame),
    ("config", config),
];

/// The mirror's request target: raw path and `?ns=` query, as containerd (or anyone) sends them. Whatever parses
/// must be safe to use as a store key or a URL path: no traversal, no percent-escapes, round-trips exactly.
pub fn names(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (path, query) = s.split_once('?').map_or((s, None), |(p, q)| (p, Some(q)));
    if let Ok(Parsed::Manifest(name, _) | Parsed::Blob(name, _)) = parse_path(path) {
        let n = name.as_str();
        assert!(!n.is_empty() && !n.starts_with('/') && !n.contains("..") && !n.contains('%') && !n.contains("//"));
        assert!(path.starts_with(&format!("/v2/{n}/")), "{path:?} parsed as {n:?}");
    }
    if let Ok(Some(host)) = registry_param(query) {
        let h = host.as_str();
        assert!(!h.contains(['/', '?', '#', '@', ' ']) && RegistryHost::parse(h).is_ok_and(|again| again == host));
    }
    for part in s.split('\n') {
        if let Ok(n) = RepoName::parse(part) {
            assert_eq!(n.as_str(), part);
        }
        if let Ok(r) = Reference::parse(part) {
            assert_eq!(r.as_str(), part);
        }
    }
}

/// Digests from paths, manifests and peers: a parsed sha256 digest names exactly 64 lowercase hex digits (its file
/// name in the store), and parsing is an exact round trip.
pub fn digest(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(d) = Digest::parse(s) else { return };
    assert_eq!(d.as_str(), s);
    if d.is_sha256() {
        let hex = d.hex();
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{s:?}");
    }
    assert_eq!(Digest::parse(d.as_str()).ok(), Some(d));
}

/// `Range` headers against blob sizes: whatever resolves is a non-empty range inside the blob.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let Ok(s) = std::str::from_utf8(&data[8..]) else { return };
    let Ok(spec) = RangeSpec::parse(s) else { return };
    if let Ok((start, end)) = spec.resolve(size) {
        assert!(start < end && end <= size, "{s:?} on {size} bytes resolved to {start}..{end}");
    }
}

/// `WWW-Authenticate` challenges from upstream registries: never a panic, and a parsed challenge's scheme and
/// parameter names are lowercase tokens.
pub fn www_authenticate(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(c) = challenge::parse(s) {
        assert!(!c.scheme.is_empty() && c.scheme == c.scheme.to_ascii_lowercase());
        assert!(c.params.keys().all(|k| !k.is_empty() && *k == k.to_ascii_lowercase()));
    }
}

/// Manifests and indexes as containerd holds them (the walk that decides what this node offers peers): never a
/// panic, and every child it returns has a valid digest.
pub fn manifest(data: &[u8]) {
    for (digest, _size, _media_type) in children(data) {
        assert!(Digest::parse(digest.as_str()).is_ok());
    }
    // The same bytes as JSON a peer or upstream might send: serde must not fall over either.
    let _ = serde_json::from_slice::<serde_json::Value>(data);
}

/// The peer protocol's frames, as a member (or anyone who got through the handshake) sends them: a request or a
/// response body, a gossip announcement; then the checks every handler runs on what decoded. Never a panic, and
/// what decodes re-encodes to something that decodes the same.
pub fn peer_frame(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            let Ok(req) = peer::Request::decode(body) else { return };
            assert_eq!(peer::Request::decode(req.encode_to_vec().as_slice()).ok(), Some(req.clone()));
            match req.kind {
                Some(request::Kind::Locate(l)) => {
                    let _ = Digest::parse(&l.digest);
                    let _ = l.fetch.map(Order::from_wire);
                }
                Some(request::Kind::ResolveTag(t)) => {
                    let _ = t.order.map(Order::from_wire);
                }
                Some(request::Kind::Announce(a)) => {
                    for h in a.holdings {
                        let _ = Holding::from_wire(h);
                    }
                }
                Some(request::Kind::GetPiece(p)) => {
                    let _ = Digest::parse(&p.digest);
                }
                Some(request::Kind::SharePins(p)) => {
                    for pin in p.pins {
                        let _ = shoal_agent::mesh::pin_from_wire(pin);
                    }
                }
                _ => {}
            }
        }
        1 => {
            let Ok(resp) = peer::Response::decode(body) else { return };
            assert_eq!(peer::Response::decode(resp.encode_to_vec().as_slice()).ok(), Some(resp.clone()));
            if let Some(response::Kind::Tag(t)) = resp.kind {
                let _ = Digest::parse(&t.digest);
            }
        }
        _ => {
            let _ = peer::MemberAnnouncement::decode(body);
        }
    }
}

/// The config file: anything an operator (or a templating accident) writes gives a config or an error naming the
/// key, never a panic.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(raw) = RawConfig::from_toml(s) {
        let _ = raw.validate();
    }
}
