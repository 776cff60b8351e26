use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::lab::Lab;
use super::suspicion::BACKSTOP;
use super::*;

const TIMING: MembershipTiming = MembershipTiming {
    probe_period: Duration::from_millis(1000),
    probe_timeout: Duration::from_millis(400),
    suspicion: Duration::from_secs(4),
    indirect_probes: 3,
    gossip: MembershipTiming::GOSSIP,
};

fn about(zone: &str, addr: SocketAddr) -> About {
    About { node: String::new(), zone: zone.into(), gossip: addr, transfer: addr }
}

fn record(key: &identity::Keypair, n: usize) -> MemberRecord {
    let addr: SocketAddr = format!("10.0.{}.{}:7000", n / 250, n % 250 + 1).parse().unwrap();
    MemberRecord::sign(key, 1, 0, &about("z", addr))
}

fn lab(n: usize, loss: f64) -> Lab {
    Lab::new(n, TIMING, loss, 7, true)
}

#[test]
fn a_cluster_forms_through_one_node_and_a_death_is_seen_by_all() {
    let mut c = lab(40, 0.0);
    c.join_all_through(0);
    let mut converged = None;
    for step in 1..=40 {
        c.run_until(Duration::from_millis(250 * step));
        if c.all_alive() {
            converged = Some(c.now());
            break;
        }
    }
    let converged = converged.expect("40 nodes see each other alive within 10 s");
    assert!(converged <= Duration::from_secs(5), "converged after {converged:?}");
    // Kill one: every live node calls it dead within a few periods plus the suspicion time.
    let victim = c.peer(17).unwrap();
    c.kill(17);
    let killed = c.now();
    let mut dead_all = None;
    for step in 1..=60 {
        c.run_until(killed + Duration::from_millis(250 * step));
        if c.seen_as(victim) == BTreeMap::from([("Dead".to_owned(), 39)]) {
            dead_all = Some(c.now() - killed);
            break;
        }
    }
    let took = dead_all.unwrap_or_else(|| panic!("not seen dead by all: {:?}", c.seen_as(victim)));
    assert!(took <= Duration::from_secs(10), "death seen by all after {took:?}");
}

#[test]
fn lost_messages_cause_no_false_death() {
    let mut c = lab(30, 0.01);
    c.join_all_through(0);
    c.run_until(Duration::from_secs(10));
    assert!(c.all_alive(), "joined despite 1 % loss");
    // A minute of 1 % loss: suspicions happen and are refuted; nobody is declared dead.
    for step in 1..=60 {
        c.run_until(Duration::from_secs(10 + step));
        for i in 0..30 {
            let seen = c.seen_as(c.peer(i).unwrap());
            assert!(!seen.contains_key("Dead"), "node {i} falsely dead at {:?}: {seen:?}", c.now());
        }
    }
}

#[test]
fn starved_nodes_are_not_declared_dead() {
    let mut c = lab(100, 0.01);
    for i in (0..100).step_by(20) {
        c.starved[i] = true;
    }
    c.join_all_through(1);
    c.run_until(Duration::from_secs(15));
    for i in 0..100 {
        let seen = c.seen_as(c.peer(i).unwrap());
        assert!(!seen.contains_key("unknown") && !seen.contains_key("Dead"), "node {i} not joined: {seen:?}");
    }
    for step in 1..=60 {
        c.run_until(Duration::from_secs(15 + step));
        for i in (0..100).step_by(20) {
            let seen = c.seen_as(c.peer(i).unwrap());
            assert!(!seen.contains_key("Dead"), "starved node {i} falsely dead at {:?}: {seen:?}", c.now());
        }
    }
}

#[test]
fn idle_cost_per_node_does_not_grow_with_the_cluster() {
    let mut per_node = Vec::new();
    for n in [20, 80] {
        let mut c = lab(n, 0.0);
        c.join_all_through(0);
        c.run_until(Duration::from_secs(20));
        assert!(c.all_alive());
        let before: u64 = c.sent.iter().sum();
        c.run_until(Duration::from_secs(80));
        let after: u64 = c.sent.iter().sum();
        per_node.push((after - before) as f64 / n as f64 / 60.0);
    }
    // Idle: two probes (and their answers) per period, whatever the size.
    assert!(per_node[1] < per_node[0] * 1.2, "messages per node per second: {per_node:?}");
    assert!(per_node[1] < 5.0, "messages per node per second: {per_node:?}");
}

fn node(n: usize) -> (identity::Keypair, MemberRecord) {
    // Keys from `n`: positions on the rings (who is whose neighbour) are the same in every run.
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(n as u64).to_be_bytes());
    let key = identity::Keypair::ed25519_from_bytes(seed).expect("32 bytes");
    let r = record(&key, n);
    (key, r)
}

/// A ping from `src` (to whoever gets it).
fn ping(src: &MemberRecord, _dst: &MemberRecord) -> Vec<u8> {
    wire::encode(src, &Body::Ping { seq: 1 }, &[])
}

const T0: Duration = Duration::ZERO;

#[test]
fn records_are_signed_and_the_sender_is_the_authenticated_peer() {
    let (key, me) = node(1);
    let (_, honest) = node(2);
    let mut m = Membership::new(key, me.clone(), TIMING, SwimRng::seeded(1), Binding::Open);
    assert_eq!(honest.verify(), Ok(()));

    // A record whose fields were changed after signing (another transfer address) is refused.
    let mut forged = honest.clone();
    forged.w.transfer = "10.9.9.9:1".parse().unwrap();
    assert_eq!(forged.verify(), Err(RecordError::Signature(honest.peer())));
    assert_eq!(m.handle_data(honest.peer(), &ping(&forged, &me), T0), Err(RecordError::Signature(honest.peer())));
    // A member sending a message in another member's name (its genuine record) is refused.
    let (_, liar) = node(3);
    assert_eq!(
        m.handle_data(liar.peer(), &ping(&honest, &me), T0),
        Err(RecordError::Impersonation { claimed: honest.peer() })
    );
    // A record signed by another key than its peer id names.
    let (other_key, _) = node(4);
    let stolen = MemberRecord::sign(&other_key, 1, 0, &honest.about());
    let stolen = MemberRecord::from(SignedFields { peer: honest.peer(), ..stolen.w });
    assert_eq!(stolen.verify(), Err(RecordError::Signature(honest.peer())));
    // A bad zone.
    let (k5, _) = node(5);
    let bad_zone = MemberRecord::sign(&k5, 1, 0, &about("a/b", honest.gossip));
    assert!(matches!(bad_zone.verify(), Err(RecordError::Field(_))));
    assert!(m.members().is_empty(), "nothing refused got in");
    // Garbage and oversized input.
    assert!(matches!(m.handle_data(honest.peer(), b"\xff\xff\xff", T0), Err(RecordError::Decode(_))));
    assert!(m.handle_data(honest.peer(), &vec![0; MAX_MESSAGE + 1], T0).is_err());
    // The honest ping is taken: the sender becomes a member and gets an answer.
    assert_eq!(m.handle_data(honest.peer(), &ping(&honest, &me), T0), Ok(0));
    assert_eq!(m.members().len(), 1);
    let mut answered = false;
    while let Some(o) = m.poll_output() {
        answered |= matches!(o, Output::Send { to, .. } if to == honest.peer());
    }
    assert!(answered);
}

#[test]
fn a_table_brings_a_new_node_every_member_at_once() {
    let mut c = lab(12, 0.0);
    c.join_all_through(0);
    c.run_until(Duration::from_secs(8));
    assert!(c.all_alive());
    let table = c.node(0).unwrap().table();
    let sender = c.peer(0).unwrap();
    let (key, me) = node(99);
    let mut fresh = Membership::new(key, me, TIMING, SwimRng::seeded(99), Binding::Open);
    assert_eq!(fresh.apply_table(sender, &table, T0), Ok(TableApplied { taken: 12, new: 12, left_out: 0 }));
    assert_eq!(fresh.members().iter().filter(|(_, l)| *l == Liveness::Alive).count(), 12);
    assert!(fresh.take_changed());
    // A table that does not hold its sender, or that was tampered with, is refused whole.
    let (key, me) = node(100);
    let mut other = Membership::new(key, me, TIMING, SwimRng::seeded(100), Binding::Open);
    assert!(other.apply_table(PeerId::random(), &table, T0).is_err());
    let mut bad = table.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x55;
    assert!(other.apply_table(sender, &bad, T0).is_err());
    assert!(other.members().is_empty());
}

#[test]
fn only_bound_members_get_in() {
    use crate::swarm::binding::{NodeBook, NodeFacts};
    let (key, me) = node(1);
    let (_, listed) = node(2);
    let (_, unlisted) = node(3);
    let list = Binding::List(Arc::new(HashMap::from([(me.peer(), None), (listed.peer(), None)])));
    let mut m = Membership::new(key, me.clone(), TIMING, SwimRng::seeded(1), list);
    assert_eq!(
        m.handle_data(unlisted.peer(), &ping(&unlisted, &me), T0),
        Err(RecordError::Unbound("peer id not in the member list"))
    );
    assert!(m.members().is_empty());
    assert_eq!(m.handle_data(listed.peer(), &ping(&listed, &me), T0), Ok(0));
    assert_eq!(m.members().len(), 1);

    // Kubernetes: a member is its Node; a record naming another node's name from its own address is refused,
    // and so is one naming a Node that does not exist. A table from an honest member leaves them out, alone.
    let book = Arc::new(NodeBook::default());
    let ip = |n: u8| std::net::IpAddr::from([10, 0, 0, n]);
    book.replace_all(HashMap::from([
        ("n1".to_owned(), NodeFacts { addresses: vec![ip(1)], zone: Some("z".into()) }),
        ("n2".to_owned(), NodeFacts { addresses: vec![ip(2)], zone: Some("z".into()) }),
    ]));
    let on = |n: &str, a: u8| About { node: n.into(), ..about("z", SocketAddr::new(ip(a), 7000)) };
    let k1 = identity::Keypair::generate_ed25519();
    let r1 = MemberRecord::sign(&k1, 1, 0, &on("n1", 1));
    let k2 = identity::Keypair::generate_ed25519();
    let r2 = MemberRecord::sign(&k2, 1, 0, &on("n2", 2));
    let liar = identity::Keypair::generate_ed25519();
    let claims_n1 = MemberRecord::sign(&liar, 1, 0, &on("n1", 3));
    let invented = MemberRecord::sign(&identity::Keypair::generate_ed25519(), 1, 0, &on("n9", 9));
    let mut m1 = Membership::new(k1, r1.clone(), TIMING, SwimRng::seeded(1), Binding::Nodes(book.clone()));
    assert_eq!(
        m1.handle_data(claims_n1.peer(), &ping(&claims_n1, &r1), T0),
        Err(RecordError::Unbound("address is not its Node's"))
    );
    assert_eq!(m1.handle_data(invented.peer(), &ping(&invented, &r1), T0), Err(RecordError::Unbound("no such Node")));
    assert!(m1.members().is_empty());
    // n2's table (built by a node that admitted everything) holds the liar and the invented member too.
    let mut m2 = Membership::new(k2, r2.clone(), TIMING, SwimRng::seeded(2), Binding::Open);
    for r in [&claims_n1, &invented] {
        m2.handle_data(r.peer(), &ping(r, &r2), T0).unwrap();
    }
    assert_eq!(m1.apply_table(r2.peer(), &m2.table(), T0), Ok(TableApplied { taken: 1, new: 1, left_out: 2 }));
    let members = m1.members();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].0.node.as_deref(), Some("n2"));
    assert_eq!(members[0].0.id, r2.peer());
    // The table goes only to a member the binding admits, asking in its own name.
    let ask = |r: &MemberRecord| postcard::to_allocvec(&(r, ALL_BUCKETS)).unwrap();
    assert!(m1.table_for(r2.peer(), &m2.table_request(ALL_BUCKETS)).is_ok());
    assert_eq!(
        m1.table_for(claims_n1.peer(), &ask(&claims_n1)),
        Err(RecordError::Unbound("address is not its Node's"))
    );
    assert_eq!(m1.table_for(invented.peer(), &ask(&invented)), Err(RecordError::Unbound("no such Node")));
    assert_eq!(m1.table_for(claims_n1.peer(), &ask(&r2)), Err(RecordError::Impersonation { claimed: r2.peer() }));
    assert!(m1.table_for(r2.peer(), b"junk").is_err());
}

/// A message from `src` carrying `updates`.
fn gossip(src: &MemberRecord, updates: &[Update]) -> Vec<u8> {
    let bytes: Vec<_> = updates.iter().map(wire::encode_update).collect();
    let refs: Vec<&[u8]> = bytes.iter().map(|b| &b[..]).collect();
    wire::encode(src, &Body::Gossip, &refs)
}

#[test]
fn only_the_member_can_refute_its_death() {
    let (key, me) = node(1);
    let (b_key, b) = node(2);
    let (_, c) = node(3);
    let mut m = Membership::new(key, me, TIMING, SwimRng::seeded(1), Binding::Open);
    m.handle_data(b.peer(), &ping(&b, &b), T0).unwrap();
    m.handle_data(c.peer(), &ping(&c, &c), T0).unwrap();
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Alive));
    // C says B is dead: taken (nobody can sign another's liveness).
    let dead = Update::Dead { key: b.key(), version: b.version() };
    m.handle_data(c.peer(), &gossip(&c, &[dead]), T0).unwrap();
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Dead));
    // C cannot bring B back: B's record as it was does not supersede its death, and a higher renewal in B's name
    // needs B's key (C's signature over it fails, and the whole message is refused).
    m.handle_data(c.peer(), &gossip(&c, &[Update::Alive(Box::new(b.clone()))]), T0).unwrap();
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Dead));
    let mut forged = MemberRecord::sign(&identity::Keypair::generate_ed25519(), 1, 1, &b.about());
    forged.w.peer = b.peer();
    let forged = MemberRecord::from(forged.w.clone());
    assert_eq!(
        m.handle_data(c.peer(), &gossip(&c, &[Update::Alive(Box::new(forged))]), T0),
        Err(RecordError::Signature(b.peer()))
    );
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Dead));
    // B itself refutes with a renewed record (relayed by anyone): alive again.
    let renewed = MemberRecord::sign(&b_key, 1, 1, &b.about());
    m.handle_data(c.peer(), &gossip(&c, &[Update::Alive(Box::new(renewed))]), T0).unwrap();
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Alive));
}

#[test]
fn an_accused_member_refutes_with_a_higher_renewal() {
    let (key, me) = node(1);
    let (_, c) = node(3);
    let mut m = Membership::new(key, me.clone(), TIMING, SwimRng::seeded(1), Binding::Open);
    m.handle_data(c.peer(), &ping(&c, &c), T0).unwrap();
    while m.poll_output().is_some() {}
    let suspect = Update::Suspect { key: me.key(), version: me.version(), by: c.key() };
    m.handle_data(c.peer(), &gossip(&c, &[suspect]), T0).unwrap();
    assert_eq!(m.me().version(), (me.version().0, me.version().1 + 1), "refuted");
    assert_eq!(m.me().verify(), Ok(()));
    assert!(m.health() > 0, "having to refute makes a node probe more slowly");
    // An accusation of an earlier version is stale: nothing to refute.
    let stale = Update::Dead { key: me.key(), version: me.version() };
    m.handle_data(c.peer(), &gossip(&c, &[stale]), T0).unwrap();
    assert_eq!(m.me().version().1, me.version().1 + 1);
    // The refutation goes out with the next message.
    m.tick(Duration::from_secs(1));
    let sent: Vec<_> = std::iter::from_fn(|| m.poll_output()).collect();
    let Some(Output::Send { data, .. }) = sent.first() else { panic!("nothing sent: {sent:?}") };
    let env = wire::decode(data).unwrap();
    assert_eq!(env.from.version().1, me.version().1 + 1);
}

#[test]
fn a_suspicion_heard_from_one_member_lasts_longer_than_a_confirmed_one() {
    // Three members, each suspected of C: with one suspecter the timeout is stretched, with three it is `suspicion`.
    let (key, me) = node(1);
    let others: Vec<_> = (2..7).map(node).collect();
    let mut m = Membership::new(key, me, TIMING, SwimRng::seeded(1), Binding::Open);
    for (_, r) in &others {
        m.handle_data(r.peer(), &ping(r, r), T0).unwrap();
    }
    // A neighbour (keys are random: with 5 others, one may not be).
    let t = others.iter().position(|(_, r)| m.table.is_neighbour(r.key())).expect("a neighbour");
    let target = others[t].1.clone();
    let rest: Vec<&MemberRecord> = others.iter().enumerate().filter(|(i, _)| *i != t).map(|(_, (_, r))| r).collect();
    let accuse = |by: &MemberRecord| Update::Suspect { key: target.key(), version: target.version(), by: by.key() };
    let a = rest[0];
    m.handle_data(a.peer(), &gossip(a, &[accuse(a)]), T0).unwrap();
    assert_eq!(m.liveness_of(&target.peer()), Some(Liveness::Suspect));
    m.tick(TIMING.suspicion + Duration::from_millis(1));
    assert_eq!(m.liveness_of(&target.peer()), Some(Liveness::Suspect), "one suspecter: not dead after `suspicion`");
    for by in &rest[1..4] {
        m.handle_data(by.peer(), &gossip(by, &[accuse(by)]), TIMING.suspicion).unwrap();
    }
    // Nobody answers this node's probes in this test, which makes it unwell (it would wait longer): it keeps up.
    set_health(&mut m, 0);
    m.tick(TIMING.suspicion + Duration::from_millis(2));
    assert_eq!(m.liveness_of(&target.peer()), Some(Liveness::Dead), "confirmed: dead after `suspicion`");
}

#[test]
fn neighbours_are_bounded_symmetric_and_cover_every_member() {
    let mut c = Lab::new(200, TIMING, 0.0, 3, false);
    c.join_all_through(0);
    for s in 1..=10 {
        c.run_until(Duration::from_secs(3 * s));
        c.pull_tables();
    }
    c.run_until(Duration::from_secs(60));
    assert!(c.all_alive());
    let mut observers: HashMap<PeerId, usize> = HashMap::new();
    for i in 0..200 {
        let m = c.node(i).unwrap();
        let mine: Vec<PeerId> = m.neighbours().collect();
        assert!(!mine.is_empty() && mine.len() <= 2 * table::RINGS, "node {i}: {} neighbours", mine.len());
        for p in mine {
            *observers.entry(p).or_default() += 1;
            let j = (0..200).find(|&j| c.peer(j) == Some(p)).unwrap();
            assert!(c.node(j).unwrap().neighbours().any(|q| q == m.me().peer()), "{i} → {j} not symmetric");
        }
    }
    assert_eq!(observers.len(), 200, "every member is somebody's neighbour (probed)");
}

#[test]
fn a_member_every_update_missed_is_found_by_the_digest_exchange() {
    // A knows C and D; B knows C alone (D's updates all went out before B heard them).
    let (ka, a) = node(1);
    let (kb, b) = node(2);
    let (_, cr) = node(3);
    let (_, d) = node(4);
    let mut ma = Membership::new(ka, a.clone(), TIMING, SwimRng::seeded(1), Binding::Open);
    let mut mb = Membership::new(kb, b.clone(), TIMING, SwimRng::seeded(2), Binding::Open);
    for r in [&b, &cr, &d] {
        ma.handle_data(r.peer(), &ping(r, r), T0).unwrap();
    }
    for r in [&a, &cr] {
        mb.handle_data(r.peer(), &ping(r, r), T0).unwrap();
    }
    while ma.poll_output().is_some() {}
    while mb.poll_output().is_some() {}
    assert_ne!(ma.digests(), mb.digests());
    // A's periodic exchange with a neighbour, B.
    let t = T0;
    let digests = ma.digests().iter().map(|d| d.to_be_bytes()).collect();
    let sync = wire::encode(&a, &Body::Sync { digests, live: 3, reply: false }, &[]);
    mb.handle_data(a.peer(), &sync, t).unwrap();
    let outputs: Vec<_> = std::iter::from_fn(|| mb.poll_output()).collect();
    let buckets = outputs
        .iter()
        .find_map(|o| match o {
            Output::PullTable { to, buckets, .. } if *to == a.peer() => Some(*buckets),
            _ => None,
        })
        .expect("B pulls the differing buckets from A");
    assert_eq!(buckets.count_ones(), 1, "only D's bucket differs: {buckets:064b}");
    let table = ma.table_for(b.peer(), &mb.table_request(buckets)).unwrap();
    assert!(table.len() < ma.table().len(), "a bucket, not the whole table");
    let applied = mb.apply_table(a.peer(), &table, t).unwrap();
    assert_eq!(applied.new, 1);
    assert_eq!(mb.liveness_of(&d.peer()), Some(Liveness::Alive));
    // B answered with its digests too, so A would pull from B what it lacks (nothing here: it has everything B has).
    assert!(outputs.iter().any(|o| matches!(o, Output::Send { to, .. } if *to == a.peer())));
    assert_eq!(ma.digests(), mb.digests());
}

#[test]
fn the_update_queue_is_bounded_and_drops_the_most_sent() {
    let mut q = Broadcasts::new(u128::MAX);
    for k in 0..table::MAX_PENDING as u128 {
        q.push(k, Bytes::from(k.to_be_bytes().to_vec()), Class::News);
    }
    // Twenty are sent once: they are now the most transmitted.
    let sent = q.take(16 * 20, 10, None);
    assert_eq!(sent.len(), 20);
    for k in 0..10u128 {
        q.push(10_000 + k, Bytes::from((10_000 + k).to_be_bytes().to_vec()), Class::News);
    }
    assert_eq!(q.len(), table::MAX_PENDING);
    let mut left = Vec::new();
    while !q.is_empty() {
        left.extend(q.take(16 * 64, 1, None));
    }
    let left: Vec<u128> = left.iter().map(|b| u128::from_be_bytes(b[..].try_into().unwrap())).collect();
    assert!((10_000..10_010).all(|k| left.contains(&k)), "the new updates are kept");
    let sent_kept = left.iter().filter(|k| sent.iter().any(|b| b[..] == k.to_be_bytes())).count();
    assert_eq!(sent_kept, 10, "the ten dropped were among the most transmitted");
}

/// The pings `m` sent to `to` since the last call, by sequence number (other messages are dropped).
fn pings_to(m: &mut Membership, to: &MemberRecord) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Some(o) = m.poll_output() {
        if let Output::Send { to: p, data, .. } = o
            && p == to.peer()
            && let Ok(env) = wire::decode(&data)
            && let Body::Ping { seq } = env.body
        {
            seqs.push(seq);
        }
    }
    seqs
}

fn ack(from: &MemberRecord, seq: u64) -> Vec<u8> {
    wire::encode(from, &Body::Ack { seq }, &[])
}

/// Ticks `m` from `t` in 100 ms steps until it pings `to` again; the ping's sequence number (`t` is then when).
fn next_ping(m: &mut Membership, to: &MemberRecord, t: &mut Duration) -> u64 {
    let give_up = *t + Duration::from_secs(60);
    loop {
        *t += Duration::from_millis(100);
        m.tick(*t);
        if let Some(seq) = pings_to(m, to).first() {
            return *seq;
        }
        assert!(*t < give_up, "no new probe of {to:?}");
    }
}

/// Node A, whose only neighbour is B (A probes B and nothing else): A's membership, B's key and record.
fn a_and_b() -> (Membership, identity::Keypair, MemberRecord) {
    let (ka, a) = node(1);
    let (kb, b) = node(2);
    let mut m = Membership::new(ka, a, TIMING, SwimRng::seeded(1), Binding::Open);
    m.handle_data(b.peer(), &ping(&b, &b), T0).unwrap();
    (m, kb, b)
}

#[test]
fn a_node_that_handles_answers_late_grows_sicker_and_only_prompt_answers_heal_it() {
    let (mut m, _, b) = a_and_b();
    let mut t = T0;
    m.tick(t);
    let first = pings_to(&mut m, &b);
    assert_eq!(first.len(), 1, "one probe of B");
    // No answer within the period: B is suspected and A is sicker (its own probe failed).
    t += TIMING.probe_period + Duration::from_millis(1);
    m.tick(t);
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Suspect));
    assert_eq!(m.health(), 1);
    // B's answer arrives after all: A accused a live member because it handled the answer late.
    m.handle_data(b.peer(), &ack(&b, first[0]), t).unwrap();
    assert_eq!(m.health(), 2, "an answer to a probe that already failed");
    // A's next probe answered slowly (later than the probe timeout) says nothing about A's health…
    let seq = next_ping(&mut m, &b, &mut t);
    let slow = t + TIMING.probe_timeout + Duration::from_millis(1);
    m.handle_data(b.peer(), &ack(&b, seq), slow).unwrap();
    assert_eq!(m.health(), 2, "a slow answer: neither better nor worse");
    // …and a prompt one heals it by a step.
    t = slow;
    let seq = next_ping(&mut m, &b, &mut t);
    m.handle_data(b.peer(), &ack(&b, seq), t + Duration::from_millis(10)).unwrap();
    assert_eq!(m.health(), 1, "a prompt answer");
}

#[test]
fn a_neighbour_that_refuted_is_probed_with_patience() {
    let (mut m, kb, b) = a_and_b();
    m.tick(T0);
    assert_eq!(pings_to(&mut m, &b).len(), 1);
    let normal = m.probes[0].until - m.probes[0].sent;
    let mut t = T0 + TIMING.probe_period + Duration::from_millis(1);
    m.tick(t);
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Suspect));
    // B refutes with a renewed record (alive and slow), and answers the probe that went out meanwhile.
    let renewed = MemberRecord::sign(&kb, 1, 1, &b.about());
    m.handle_data(b.peer(), &gossip(&renewed, &[]), t).unwrap();
    assert_eq!(m.liveness_of(&b.peer()), Some(Liveness::Alive));
    for seq in pings_to(&mut m, &b) {
        m.handle_data(renewed.peer(), &ack(&renewed, seq), t).unwrap();
    }
    assert!(m.probes.is_empty());
    next_ping(&mut m, &b, &mut t);
    let p = m.probes.iter().find(|p| p.peer == b.peer()).expect("a probe of B");
    // The period stretched by A's health, times the patience for a member that refuted.
    assert_eq!(p.until - p.sent, m.period() * PATIENCE);
    assert!(p.until - p.sent >= normal * PATIENCE, "{:?} vs {normal:?}", p.until - p.sent);
    // Long after, B is probed as any member again.
    let later = t + TIMING.probe_period * (SLOW_FOR + 10) * (1 + MAX_HEALTH);
    m.handle_data(b.peer(), &gossip(&renewed, &[]), later).unwrap();
    m.tick(later);
    assert!(m.slow.is_empty(), "forgotten after SLOW_FOR periods");
}

#[test]
fn the_update_queue_sends_this_nodes_own_update_first_then_news_then_suspicions() {
    let mut q = Broadcasts::new(7);
    for k in 0..5u128 {
        q.push(k, Bytes::from(k.to_be_bytes().to_vec()), Class::News);
    }
    q.push(9, Bytes::from(9u128.to_be_bytes().to_vec()), Class::Suspicion);
    q.push(7, Bytes::from(7u128.to_be_bytes().to_vec()), Class::Suspicion);
    q.push(5, Bytes::from(5u128.to_be_bytes().to_vec()), Class::News);
    let ids = |q: &mut Broadcasts| -> Vec<u128> {
        q.take(16 * 3, 2, None).iter().map(|b| u128::from_be_bytes(b[..].try_into().unwrap())).collect()
    };
    // This node's own update first (until sent `limit` times), then the news never sent, newest first…
    assert_eq!(ids(&mut q), vec![7, 5, 4]);
    assert_eq!(ids(&mut q), vec![7, 3, 2]);
    // …and the suspicion never sent after the news never sent, before anything sent once.
    assert_eq!(ids(&mut q), vec![1, 0, 9]);
    assert_eq!(q.fresh(), 0, "every update was sent once");
    assert_eq!(ids(&mut q), vec![5, 4, 3]);
    q.push(4, Bytes::from(4u128.to_be_bytes().to_vec()), Class::Suspicion);
    assert_eq!((q.fresh(), q.len()), (1, 5), "4, sent twice and dropped, queued again");
}

#[test]
fn refutations_and_deaths_go_ahead_of_everything_but_this_nodes_own_for_a_few_sends() {
    let mut q = Broadcasts::new(u128::MAX);
    for k in 0..4u128 {
        q.push(k, Bytes::from(k.to_be_bytes().to_vec()), Class::Suspicion);
    }
    q.push(10, Bytes::from(10u128.to_be_bytes().to_vec()), Class::Urgent);
    for k in 20..22u128 {
        q.push(k, Bytes::from(k.to_be_bytes().to_vec()), Class::News);
    }
    let ids = |q: &mut Broadcasts| -> Vec<u128> {
        q.take(16 * 2, 10, None).iter().map(|b| u128::from_be_bytes(b[..].try_into().unwrap())).collect()
    };
    // The refutation rides on each of the next URGENT_SENDS messages, ahead of updates never sent…
    for _ in 0..table::URGENT_SENDS {
        assert_eq!(ids(&mut q)[0], 10);
    }
    // …then waits its turn among the updates sent as often.
    assert!(!ids(&mut q).contains(&10));
}

#[test]
fn only_the_suspects_neighbours_declare_it_dead_when_its_timeout_runs_out() {
    // 40 members: this node is the neighbour of a few of them only.
    let (key, me) = node(1);
    let others: Vec<_> = (2..42).map(node).collect();
    let mut m = Membership::new(key, me, TIMING, SwimRng::seeded(1), Binding::Open);
    for (_, r) in &others {
        m.handle_data(r.peer(), &ping(r, r), T0).unwrap();
    }
    let records: Vec<&MemberRecord> = others.iter().map(|(_, r)| r).collect();
    let near = *records.iter().find(|r| m.table.is_neighbour(r.key())).expect("a neighbour");
    let mut fars = others.iter().filter(|(_, r)| !m.table.is_neighbour(r.key()));
    let far = &fars.next().expect("a member that is not a neighbour").1;
    let (far2_key, far2) = fars.next().expect("another");
    let accuse = |who: &MemberRecord, by: &MemberRecord| Update::Suspect {
        key: who.key(),
        version: who.version(),
        by: by.key(),
    };
    // Four members suspect both: confirmed, so the timeout is `suspicion` itself.
    let suspects = [near.key(), far.key(), far2.key()];
    for by in records.iter().filter(|r| !suspects.contains(&r.key())).take(4) {
        let u = [accuse(near, by), accuse(far, by), accuse(far2, by)];
        m.handle_data(by.peer(), &gossip(by, &u), T0).unwrap();
    }
    // A node that keeps up (nobody answers its probes in this test, which would make it wait longer).
    set_health(&mut m, 0);
    m.tick(T0 + TIMING.suspicion + Duration::from_millis(1));
    assert_eq!(m.liveness_of(&near.peer()), Some(Liveness::Dead), "a neighbour declares the suspect dead");
    assert_eq!(
        m.liveness_of(&far.peer()),
        Some(Liveness::Suspect),
        "anyone else waits for the neighbours' word (their refutation reaches the neighbours first)"
    );
    // With no word from the neighbours, the backstop.
    let backstop = TIMING.suspicion * SUSPICION_STRETCH * BACKSTOP;
    set_health(&mut m, 0);
    m.tick(T0 + backstop - Duration::from_millis(1));
    assert_eq!(m.liveness_of(&far.peer()), Some(Liveness::Suspect));
    set_health(&mut m, 0);
    let t = T0 + backstop + Duration::from_millis(1);
    m.tick(t);
    // At the backstop it asks the suspects themselves first.
    let sent: Vec<Output> = std::iter::from_fn(|| m.poll_output()).collect();
    let pinged = |who: &MemberRecord| {
        sent.iter().find_map(|o| match o {
            Output::Send { to, data, .. } if *to == who.peer() => match wire::decode(data).ok()?.body {
                Body::Ping { seq } => Some(seq),
                _ => None,
            },
            _ => None,
        })
    };
    assert!(pinged(far).is_some(), "the suspect is asked at the backstop: {sent:?}");
    let seq = pinged(far2).expect("both suspects are asked");
    assert_eq!(m.liveness_of(&far.peer()), Some(Liveness::Suspect));
    // far2 heard the suspicion in the ping and answers with its refutation; far does not answer.
    let refuted = MemberRecord::sign(far2_key, far2.version().0, far2.version().1 + 1, &far2.about());
    m.handle_data(far2.peer(), &ack(&refuted, seq), t + Duration::from_millis(5)).unwrap();
    assert_eq!(m.liveness_of(&far2.peer()), Some(Liveness::Alive), "its answer refutes the suspicion");
    set_health(&mut m, 0);
    m.tick(t + TIMING.probe_period + Duration::from_millis(1));
    assert_eq!(m.liveness_of(&far.peer()), Some(Liveness::Dead), "no answer: dead, a period after the backstop");
}

/// Sets this node's local health, its unanswered probes forgotten (they would make it sicker at the next tick).
fn set_health(m: &mut Membership, health: u32) {
    m.health = health;
    m.probes.clear();
}

#[test]
fn an_unwell_node_waits_longer_before_declaring_a_neighbour_dead() {
    let (key, me) = node(1);
    let others: Vec<_> = (2..8).map(node).collect();
    let mut m = Membership::new(key, me, TIMING, SwimRng::seeded(1), Binding::Open);
    for (_, r) in &others {
        m.handle_data(r.peer(), &ping(r, r), T0).unwrap();
    }
    // A neighbour (keys are random: with 6 others, one may not be).
    let t = others.iter().position(|(_, r)| m.table.is_neighbour(r.key())).expect("a neighbour");
    let target = others[t].1.clone();
    for (_, by) in others.iter().enumerate().filter(|(i, _)| *i != t).map(|(_, o)| o).take(4) {
        let u = Update::Suspect { key: target.key(), version: target.version(), by: by.key() };
        m.handle_data(by.peer(), &gossip(by, &[u]), T0).unwrap();
    }
    // Starved, say: it would handle the target's refutation late.
    set_health(&mut m, 2);
    m.tick(T0 + TIMING.suspicion + Duration::from_millis(1));
    assert_eq!(m.liveness_of(&target.peer()), Some(Liveness::Suspect), "unwell: not dead at the timeout");
    set_health(&mut m, 2);
    m.tick(T0 + TIMING.suspicion * 3 - Duration::from_millis(1));
    assert_eq!(m.liveness_of(&target.peer()), Some(Liveness::Suspect));
    set_health(&mut m, 2);
    m.tick(T0 + TIMING.suspicion * 3 + Duration::from_millis(1));
    assert_eq!(m.liveness_of(&target.peer()), Some(Liveness::Dead), "(1 + health) × the timeout, once");
}
