//! Parsers for what a client puts in a request: repository names, references, digests, registry hosts and
//! `Range` headers, to the OCI distribution spec's grammar.
//!
//! Everything here is checked on the raw, undecoded request path, so no percent-encoding, `..` or `/` trick can
//! reach a file name: a valid [`RepoName`] cannot contain `%`, `..`, a leading `/` or a NUL, and a valid
//! [`Digest`] is an algorithm and lowercase hex only.

use std::fmt;

/// Manifest or blob: what a request, a download, an order to a home or an upstream request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/manifests/<digest>`
    Manifest,
    /// `/blobs/<digest>`
    Blob,
}

/// Longest repository name the spec allows (including the registry host in a full reference).
const MAX_NAME_LEN: usize = 255;

/// Why a request's name, reference, digest or range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The repository name does not match the distribution spec's grammar.
    #[error("invalid repository name: {0}")]
    Name(&'static str),
    /// The tag does not match `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    #[error("invalid tag")]
    Tag,
    /// The digest is not `algorithm:encoded` with a known algorithm's encoding.
    #[error("invalid digest: {0}")]
    Digest(&'static str),
    /// The registry host (`ns` parameter) is not `host[:port]`.
    #[error("invalid registry host")]
    Host,
}

/// A repository name, e.g. `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoName(String);

impl RepoName {
    /// Parses a name: path components of `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`, separated by `/`.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() {
            return Err(ParseError::Name("empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(ParseError::Name("longer than 255 characters"));
        }
        for component in s.split('/') {
            check_component(component)?;
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_component(c: &str) -> Result<(), ParseError> {
    let b = c.as_bytes();
    if b.is_empty() {
        return Err(ParseError::Name("empty path component"));
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(ParseError::Name("a path component must start and end with [a-z0-9]"));
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", always followed by an alphanumeric.
        let sep = match b[i] {
            b'.' => 1,
            b'_' if b.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return Err(ParseError::Name("only [a-z0-9._-] are allowed in a path component")),
        };
        i += sep;
        if !b.get(i).copied().is_some_and(alnum) {
            return Err(ParseError::Name("a separator must be followed by [a-z0-9]"));
        }
    }
    Ok(())
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A content digest. Only `sha256` is verifiable (and so cacheable) by this agent; other algorithms of the
/// spec's grammar parse but report [`Digest::is_sha256`] false.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `algorithm:encoded`.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let (alg, enc) = s.split_once(':').ok_or(ParseError::Digest("missing ':'"))?;
        match alg {
            "sha256" => {
                if enc.len() != 64 || !enc.bytes().all(is_lower_hex) {
                    return Err(ParseError::Digest("sha256 needs 64 lowercase hex characters"));
                }
            }
            "sha512" => {
                if enc.len() != 128 || !enc.bytes().all(is_lower_hex) {
                    return Err(ParseError::Digest("sha512 needs 128 lowercase hex characters"));
                }
            }
            _ => return Err(ParseError::Digest("unknown algorithm")),
        }
        Ok(Self(s.to_owned()))
    }

    /// Builds the digest of a sha256 hash.
    pub fn from_sha256(hash: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(hash)))
    }

    /// Whether this is a sha256 digest (the only kind the store verifies and keeps).
    pub fn is_sha256(&self) -> bool {
        self.0.starts_with("sha256:")
    }

    /// The hex part after the algorithm.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }

    /// The digest as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(String),
    /// An immutable digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a tag or, if it contains `:`, a digest.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.contains(':') {
            return Digest::parse(s).map(Self::Digest);
        }
        let b = s.as_bytes();
        let first_ok = b.first().is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(ParseError::Tag);
        }
        Ok(Self::Tag(s.to_owned()))
    }

    /// The reference as it appears in a URL.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Tag(t) => t,
            Self::Digest(d) => d.as_str(),
        }
    }
}

/// A registry host as containerd names it in `?ns=`: `host[:port]`, e.g. `docker.io` or `127.0.0.1:5000`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(String);

impl RegistryHost {
    /// Parses a host name or IPv4 address with an optional port, or a bracketed IPv6 address.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or(ParseError::Host)?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(ParseError::Host);
            }
            let port = if after.is_empty() { None } else { Some(after.strip_prefix(':').ok_or(ParseError::Host)?) };
            (None, port)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (Some(h), Some(p)),
                None => (Some(s), None),
            }
        };
        if let Some(h) = host {
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if !ok {
                return Err(ParseError::Host);
            }
        }
        if let Some(p) = port
            && (p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) || p.parse::<u16>().is_err())
        {
            return Err(ParseError::Host);
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The host as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for RegistryHost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for RegistryHost {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a `Range` header asks for, before the blob's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=start-` or `bytes=start-end` (inclusive end).
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive, if given.
        end: Option<u64>,
    },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

/// Why a `Range` header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not `bytes=…` with one well-formed range.
    #[error("malformed Range header")]
    Malformed,
    /// A range unit other than `bytes`: the header is to be ignored (RFC 9110 §14.2), the whole content sent.
    #[error("unknown range unit")]
    UnknownUnit,
    /// More than one range: this server serves a single range only.
    #[error("multiple ranges are not supported")]
    Multiple,
    /// The range starts past the end of the blob.
    #[error("range not satisfiable")]
    Unsatisfiable,
}

impl RangeSpec {
    /// Parses a `Range` header value holding a single byte range.
    pub fn parse(s: &str) -> Result<Self, RangeError> {
        let (unit, spec) = s.trim().split_once('=').ok_or(RangeError::Malformed)?;
        if !unit.trim().eq_ignore_ascii_case("bytes") {
            return Err(RangeError::UnknownUnit);
        }
        if spec.contains(',') {
            return Err(RangeError::Multiple);
        }
        let (a, b) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
        let num = |x: &str| -> Result<u64, RangeError> {
            if x.is_empty() || x.len() > 19 || !x.bytes().all(|c| c.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            x.parse().map_err(|_| RangeError::Malformed)
        };
        if a.is_empty() {
            let n = num(b)?;
            if n == 0 {
                return Err(RangeError::Unsatisfiable);
            }
            return Ok(Self::Suffix(n));
        }
        let start = num(a)?;
        let end = if b.is_empty() { None } else { Some(num(b)?) };
        if end.is_some_and(|e| e < start) {
            return Err(RangeError::Malformed);
        }
        Ok(Self::From { start, end })
    }

    /// Resolves against a blob of `size` bytes into a half-open `[start, end)` range.
    pub fn resolve(self, size: u64) -> Result<(u64, u64), RangeError> {
        match self {
            Self::From { start, end } => {
                if start >= size {
                    return Err(RangeError::Unsatisfiable);
                }
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                Ok((start, end))
            }
            Self::Suffix(n) => {
                if size == 0 {
                    return Err(RangeError::Unsatisfiable);
                }
                Ok((size.saturating_sub(n), size))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["a", "library/alpine", "a/b/c", "foo.bar", "a__b", "a---b", "a_b-c.d/e0"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "..", "a/../b", "a/./b", "a%2fb", "%2e%2e", "a___b", "-a", "a-", "a.", "a b",
            "a\0b", "a\\b",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn digests_and_refs() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(Digest::parse(&d).unwrap().is_sha256());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("md5:{}", "a".repeat(32))).is_err());
        assert!(Digest::parse(&format!("sha256:{}/../x", "a".repeat(64))).is_err());
        assert_eq!(Reference::parse("latest").unwrap(), Reference::Tag("latest".into()));
        assert!(matches!(Reference::parse(&d).unwrap(), Reference::Digest(_)));
        for bad in ["", ".x", "-x", "a/b", &"a".repeat(129), "a%20"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        for ok in ["docker.io", "127.0.0.1:5000", "registry-1.docker.io", "[::1]:5000", "[::1]", "localhost"] {
            assert!(RegistryHost::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a:", "a:99999", "a..b", "-a.com", "[::1", "a:b", "a b", "a@b"] {
            assert!(RegistryHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(RangeSpec::parse("bytes=0-9").unwrap().resolve(100), Ok((0, 10)));
        assert_eq!(RangeSpec::parse("bytes=90-").unwrap().resolve(100), Ok((90, 100)));
        assert_eq!(RangeSpec::parse("bytes=90-1000").unwrap().resolve(100), Ok((90, 100)));
        assert_eq!(RangeSpec::parse("bytes=-10").unwrap().resolve(100), Ok((90, 100)));
        assert_eq!(RangeSpec::parse("bytes=-1000").unwrap().resolve(100), Ok((0, 100)));
        assert_eq!(RangeSpec::parse("bytes=100-").unwrap().resolve(100), Err(RangeError::Unsatisfiable));
        assert_eq!(RangeSpec::parse("bytes=0-1,3-4"), Err(RangeError::Multiple));
        assert_eq!(RangeSpec::parse("pages=1-2"), Err(RangeError::UnknownUnit));
        assert_eq!(RangeSpec::parse("Bytes=0-9").unwrap().resolve(100), Ok((0, 10)));
        for bad in ["", "bytes=", "bytes=a-b", "items=0-1", "bytes=5-1", "bytes=-", "bytes=99999999999999999999-"] {
            assert!(RangeSpec::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}") {
            let _ = RepoName::parse(&s);
            let _ = Reference::parse(&s);
            let _ = Digest::parse(&s);
            let _ = RegistryHost::parse(&s);
            if let Ok(r) = RangeSpec::parse(&s) { let _ = r.resolve(1000); }
        }

        #[test]
        fn valid_names_are_safe_paths(s in "[a-z0-9._/-]{1,80}") {
            if let Ok(n) = RepoName::parse(&s) {
                prop_assert!(!n.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
            }
        }

        #[test]
        fn resolved_ranges_are_in_bounds(start in 0u64..2000, len in proptest::option::of(0u64..2000), size in 0u64..1500) {
            let spec = RangeSpec::From { start, end: len.map(|l| start + l) };
            if let Ok((a, b)) = spec.resolve(size) {
                prop_assert!(a < b && b <= size);
            }
        }
    }
}
