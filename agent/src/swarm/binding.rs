//! What a member's identity is bound to, so that nobody can pick it: who may be a member, from which address, in
//! which zone, and where it sits on the homes' ring.
//!
//! A peer id comes from a key any node can generate at will: a member free to choose it could grind keys until its
//! point on the ring makes it the home of a digest or tag it wants, and invent members without limit. So in
//! Kubernetes a member is its Node: its record names the Node, the Node must exist (as the API server says, through
//! [`NodeBook`]) and carry the record's addresses, the zone is the Node's label, and the ring point comes from the
//! Node's name, which the member did not choose; one record per Node. Outside Kubernetes the operator lists the
//! members' peer ids (each optionally with its address). [`Binding::Open`] binds nothing (any holder of the cluster
//! secret, any id): for tests and single-operator networks, and said so at start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use libp2p::PeerId;

/// What the API server says about a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Its addresses (`status.addresses`: internal and external IPs).
    pub addresses: Vec<IpAddr>,
    /// Its zone label, if it has one.
    pub zone: Option<String>,
}

/// The cluster's Nodes as last listed and watched (filled by the agent's watcher; read by [`Binding::admit`]).
#[derive(Debug, Default)]
pub struct NodeBook {
    nodes: RwLock<HashMap<String, NodeFacts>>,
    ready: AtomicBool,
}

impl NodeBook {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, NodeFacts>> {
        self.nodes.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, NodeFacts>> {
        self.nodes.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces every Node (a full list) and marks the book ready.
    pub fn replace_all(&self, nodes: HashMap<String, NodeFacts>) {
        *self.write() = nodes;
        self.ready.store(true, Ordering::Release);
    }

    /// A Node added or changed.
    pub fn upsert(&self, name: String, facts: NodeFacts) {
        self.write().insert(name, facts);
    }

    /// A Node deleted.
    pub fn remove(&self, name: &str) {
        self.write().remove(name);
    }

    /// A Node's facts.
    pub fn get(&self, name: &str) -> Option<NodeFacts> {
        self.read().get(name).cloned()
    }

    /// Whether a full list arrived.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Nodes known.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no Node is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Who may be a member.
#[derive(Debug, Clone, Default)]
pub enum Binding {
    /// Anyone holding the cluster secret, under any peer id (nothing bound).
    #[default]
    Open,
    /// Only these peer ids, each from this address when one is given.
    List(Arc<HashMap<PeerId, Option<IpAddr>>>),
    /// Kubernetes Nodes.
    Nodes(Arc<NodeBook>),
}

/// What a member claims, as the binding checks it.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// Its peer id (proven by its signature).
    pub peer: PeerId,
    /// The Node it names (empty: none).
    pub node: &'a str,
    /// Its zone.
    pub zone: &'a str,
    /// Its gossip and transfer addresses' IPs.
    pub ips: [IpAddr; 2],
}

impl Binding {
    /// Whether a member claiming `c` is admitted; the reason if not.
    pub fn admit(&self, c: &Claim<'_>) -> Result<(), &'static str> {
        match self {
            Self::Open => Ok(()),
            Self::List(list) => match list.get(&c.peer) {
                None => Err("peer id not in the member list"),
                Some(Some(ip)) if c.ips.iter().any(|a| a != ip) => Err("address is not the one listed for it"),
                Some(_) => Ok(()),
            },
            Self::Nodes(book) => {
                if c.node.is_empty() {
                    return Err("names no Kubernetes Node");
                }
                let Some(facts) = book.get(c.node) else { return Err("no such Node") };
                if !c.ips.iter().all(|ip| facts.addresses.contains(ip)) {
                    return Err("address is not its Node's");
                }
                if facts.zone.as_deref().is_some_and(|z| z != c.zone) {
                    return Err("zone is not its Node's label");
                }
                Ok(())
            }
        }
    }

    /// Whether members are bound to something they cannot choose.
    pub fn is_bound(&self) -> bool {
        !matches!(self, Self::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_member_is_admitted_only_as_what_it_is_bound_to() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let claim = |peer, node, zone, at: &str| Claim { peer, node, zone, ips: [ip(at), ip(at)] };
        assert!(Binding::Open.admit(&claim(a, "", "z", "10.0.0.1")).is_ok());

        let list = Binding::List(Arc::new(HashMap::from([(a, Some(ip("10.0.0.1"))), (b, None)])));
        assert!(list.admit(&claim(a, "", "z", "10.0.0.1")).is_ok());
        assert_eq!(list.admit(&claim(a, "", "z", "10.0.0.9")), Err("address is not the one listed for it"));
        assert!(list.admit(&claim(b, "", "z", "10.0.0.9")).is_ok(), "listed without an address");
        assert_eq!(list.admit(&claim(PeerId::random(), "", "z", "10.0.0.1")), Err("peer id not in the member list"));

        let book = Arc::new(NodeBook::default());
        book.replace_all(HashMap::from([
            ("n1".to_owned(), NodeFacts { addresses: vec![ip("10.0.0.1")], zone: Some("z1".into()) }),
            ("n2".to_owned(), NodeFacts { addresses: vec![ip("10.0.0.2")], zone: None }),
        ]));
        let nodes = Binding::Nodes(book.clone());
        assert!(nodes.admit(&claim(a, "n1", "z1", "10.0.0.1")).is_ok());
        // Any key may run on the node; what binds is the node's name, address and label.
        assert!(nodes.admit(&claim(b, "n1", "z1", "10.0.0.1")).is_ok());
        assert_eq!(nodes.admit(&claim(a, "", "z1", "10.0.0.1")), Err("names no Kubernetes Node"));
        assert_eq!(nodes.admit(&claim(a, "n3", "z1", "10.0.0.1")), Err("no such Node"));
        assert_eq!(nodes.admit(&claim(a, "n1", "z1", "10.0.0.2")), Err("address is not its Node's"));
        assert_eq!(nodes.admit(&claim(a, "n1", "z2", "10.0.0.1")), Err("zone is not its Node's label"));
        assert!(nodes.admit(&claim(a, "n2", "any", "10.0.0.2")).is_ok(), "no label: nothing to hold the zone to");
        // A mixed claim: gossip on the node, transfer elsewhere.
        let mixed = Claim { ips: [ip("10.0.0.1"), ip("10.0.0.2")], ..claim(a, "n1", "z1", "10.0.0.1") };
        assert_eq!(nodes.admit(&mixed), Err("address is not its Node's"));
        book.remove("n1");
        assert_eq!(nodes.admit(&claim(a, "n1", "z1", "10.0.0.1")), Err("no such Node"));
    }
}
