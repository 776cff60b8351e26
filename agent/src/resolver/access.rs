//! Access to cached content: which client may be given bytes from the cache.
//!
//! Content fetched without a client's credentials is public: anyone may have it. Content a client's credentials
//! were needed for is given to a client only after a registry *trusted to say so* accepted this client's
//! credentials for a repository holding it (remembered for `auth_ttl`; while that registry is unreachable, what it
//! ever accepted). Trusted to say so, for a digest: the registry it was fetched from (recorded with the blob), or a
//! registry the operator configured. A registry a client merely names (an unlisted one, with
//! `allow_unlisted_registries`) could answer "yes" to anything: it unlocks what it served itself and nothing else,
//! so naming a server that answers 200 to every request opens no private content.
//!
//! The decisions here are pure: the clock is passed in, the upstream question is the caller's.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Client;
use crate::oci::RegistryHost;

/// Credentials remembered at most (oldest forgotten first): one per client identity and repository.
const MAX_ACCEPTED: usize = 65_536;

/// Who fetched something, for what repository, with which credentials (hashed; never kept in the clear).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Origin {
    /// The registry the client named.
    pub(super) registry: RegistryHost,
    /// `registry/repo`.
    pub(super) repo_key: String,
    /// A keyed hash of the client's `Authorization`, if any.
    pub(super) cred: Option<u64>,
}

/// Where a copy of some content came from, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Provenance {
    /// Fetched without a client's credentials.
    pub(super) public: bool,
    /// The registry it was fetched from, when this node fetched it (unknown for peers' and containerd's copies).
    pub(super) registry: Option<RegistryHost>,
}

/// What a client needs before it may be given a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Give it.
    Allow,
    /// The client's registry cannot vouch for this content: serve nothing from the cache (the client goes to its
    /// registry itself).
    Untrusted,
    /// Ask the client's registry whether these credentials may read the digest in this repository.
    AskUpstream,
}

/// The credentials upstream accepted, per repository.
#[derive(Debug)]
pub(super) struct Access {
    accepted: Mutex<HashMap<(u64, String), Instant>>,
    hasher: std::hash::RandomState,
    ttl: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("the access lock is never poisoned: no code panics while holding it")
}

impl Access {
    /// Trusts accepted credentials for `ttl`.
    pub(super) fn new(ttl: Duration) -> Self {
        Self { accepted: Mutex::default(), hasher: std::hash::RandomState::new(), ttl }
    }

    /// The identity `client` acts as.
    pub(super) fn origin(&self, client: &Client) -> Origin {
        Origin {
            registry: client.registry.clone(),
            repo_key: client.repo_key(),
            cred: client.auth.as_ref().map(|a| self.hasher.hash_one(a.as_bytes())),
        }
    }

    /// The client's registry accepted its credentials for its repository at `now`.
    pub(super) fn note_accepted(&self, origin: &Origin, now: Instant) {
        let Some(c) = origin.cred else { return };
        let mut map = lock(&self.accepted);
        if map.len() >= MAX_ACCEPTED && !map.contains_key(&(c, origin.repo_key.clone())) {
            // Forget the oldest (expired ones first by construction: they are the oldest).
            if let Some(oldest) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert((c, origin.repo_key.clone()), now);
    }

    /// Whether the credentials were accepted for the repository within the trust period before `now`.
    pub(super) fn accepted_recently(&self, origin: &Origin, now: Instant) -> bool {
        origin.cred.is_some_and(|c| {
            lock(&self.accepted)
                .get(&(c, origin.repo_key.clone()))
                .is_some_and(|t| now.saturating_duration_since(*t) < self.ttl)
        })
    }

    /// Whether the credentials were ever accepted for the repository (since start): enough while the registry
    /// cannot be asked.
    pub(super) fn accepted_ever(&self, origin: &Origin) -> bool {
        origin.cred.is_some_and(|c| lock(&self.accepted).contains_key(&(c, origin.repo_key.clone())))
    }

    /// What `client` needs to be given a copy of this `provenance`: `linked` says the client's repository is known
    /// to hold the digest (`Some(true)`: served without credentials), `configured` whether the client's registry
    /// is one the operator configured.
    pub(super) fn decide(
        &self,
        client: &Origin,
        provenance: &Provenance,
        linked: Option<bool>,
        configured: bool,
        now: Instant,
    ) -> Decision {
        if provenance.public {
            return Decision::Allow;
        }
        let trusted = configured || provenance.registry.as_ref() == Some(&client.registry);
        if !trusted {
            return Decision::Untrusted;
        }
        match linked {
            Some(true) => Decision::Allow,
            Some(false) if self.accepted_recently(client, now) => Decision::Allow,
            _ => Decision::AskUpstream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::RepoName;

    fn client(registry: &str, repo: &str, auth: Option<&'static str>) -> Client {
        Client {
            registry: RegistryHost::parse(registry).expect("valid host"),
            repo: RepoName::parse(repo).expect("valid repo"),
            auth: auth.map(http::HeaderValue::from_static),
            accept: None,
        }
    }

    fn private_from(registry: &str) -> Provenance {
        Provenance { public: false, registry: Some(RegistryHost::parse(registry).expect("valid host")) }
    }

    #[test]
    fn public_content_is_anyones() {
        let a = Access::new(Duration::from_secs(60));
        let o = a.origin(&client("evil.example", "x", None));
        let p = Provenance { public: true, registry: None };
        assert_eq!(a.decide(&o, &p, None, false, Instant::now()), Decision::Allow);
    }

    #[test]
    fn a_registry_a_client_names_unlocks_only_what_it_served() {
        let a = Access::new(Duration::from_secs(60));
        let now = Instant::now();
        let evil = a.origin(&client("evil.example", "private/app", Some("Basic eA==")));
        // Private content from a real registry: a swapped, unconfigured registry is never asked, whatever it
        // would answer, and links or acceptances recorded under it change nothing.
        a.note_accepted(&evil, now);
        for linked in [None, Some(false), Some(true)] {
            assert_eq!(a.decide(&evil, &private_from("registry.example"), linked, false, now), Decision::Untrusted);
        }
        // What the unlisted registry served itself: it is the authority on its own content.
        assert_eq!(a.decide(&evil, &private_from("evil.example"), None, false, now), Decision::AskUpstream);
        // A configured registry is believed about any digest.
        assert_eq!(a.decide(&evil, &private_from("registry.example"), None, true, now), Decision::AskUpstream);
        // Unknown provenance (a peer's or containerd's copy): only a configured registry can vouch.
        let unknown = Provenance { public: false, registry: None };
        assert_eq!(a.decide(&evil, &unknown, None, false, now), Decision::Untrusted);
    }

    #[test]
    fn accepted_credentials_are_trusted_for_the_ttl_only() {
        let a = Access::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let o = a.origin(&client("registry.example", "private/app", Some("Basic eA==")));
        let p = private_from("registry.example");
        assert_eq!(a.decide(&o, &p, Some(false), false, t0), Decision::AskUpstream);
        a.note_accepted(&o, t0);
        assert_eq!(a.decide(&o, &p, Some(false), false, t0 + Duration::from_secs(59)), Decision::Allow);
        assert_eq!(a.decide(&o, &p, Some(false), false, t0 + Duration::from_secs(61)), Decision::AskUpstream);
        assert!(a.accepted_ever(&o));
        // Other credentials, or another repository, are other identities.
        let other = a.origin(&client("registry.example", "private/app", Some("Basic eQ==")));
        assert!(!a.accepted_recently(&other, t0));
        let repo = a.origin(&client("registry.example", "private/other", Some("Basic eA==")));
        assert!(!a.accepted_recently(&repo, t0));
    }

    #[test]
    fn remembered_credentials_are_bounded() {
        let a = Access::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..MAX_ACCEPTED + 10 {
            let o = a.origin(&client("registry.example", &format!("r{i}"), Some("Basic eA==")));
            a.note_accepted(&o, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(lock(&a.accepted).len(), MAX_ACCEPTED);
        let first = a.origin(&client("registry.example", "r0", Some("Basic eA==")));
        assert!(!a.accepted_ever(&first), "the oldest is forgotten first");
    }
}
