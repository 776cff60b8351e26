//! Parsing of `WWW-Authenticate` challenges (RFC 9110 §11.6.1), as registries send them:
//! `Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"` or
//! `Basic realm="Registry Realm"`.

use std::collections::BTreeMap;

/// One parsed challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lowercased (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: BTreeMap<String, String>,
}

/// Parses the first challenge of a header value. Returns `None` for anything malformed.
pub fn parse(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, mut rest) = match value.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&value[..i], value[i..].trim_start()),
        None => (value, ""),
    };
    if scheme.is_empty() || !scheme.bytes().all(is_tchar) {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return None;
        }
        rest = rest[eq + 1..].trim_start();
        let val;
        if let Some(q) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?.1),
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => out.push(c),
                }
            }
            rest = &q[end? + 1..];
            val = out;
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            val = rest[..end].trim().to_owned();
            if !val.bytes().all(is_tchar) {
                return None;
            }
            rest = &rest[end..];
        }
        params.insert(name.to_ascii_lowercase(), val);
        rest = rest.trim_start();
        match rest.strip_prefix(',') {
            Some(r) => rest = r.trim_start(),
            None if rest.is_empty() => {}
            // Another challenge follows (`, Basic realm=…`): keep only the first.
            None => break,
        }
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bearer() {
        let c = parse(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#).unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
    }

    #[test]
    fn basic_and_odd_forms() {
        assert_eq!(parse(r#"Basic realm="Registry Realm""#).unwrap().params["realm"], "Registry Realm");
        assert_eq!(parse("Basic").unwrap().scheme, "basic");
        assert_eq!(parse(r#"Bearer realm = "a\"b" , error=insufficient_scope"#).unwrap().params["realm"], "a\"b");
        assert_eq!(parse("Bearer realm=x").unwrap().params["realm"], "x");
        assert!(parse(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse("").is_none());
        assert!(parse("Bearer =x").is_none());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }
    }
}
