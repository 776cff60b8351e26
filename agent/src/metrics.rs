//! Prometheus metrics, one struct per subsystem, registered into a registry the caller owns. Label values come
//! from small fixed sets (never a digest, a repository or an address).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Mirror routes.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Route {
    /// `/v2/`
    base,
    /// `/v2/<name>/manifests/<ref>`
    manifest,
    /// `/v2/<name>/blobs/<digest>`
    blob,
    /// Anything else.
    other,
}

/// Status classes.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StatusClass {
    /// 2xx
    success,
    /// 401
    unauthorized,
    /// 404
    not_found,
    /// Other 4xx
    client_error,
    /// 5xx
    server_error,
    /// The response body ended abnormally (verification failure, upstream gone).
    aborted,
}

impl StatusClass {
    /// Classifies an HTTP status.
    pub fn of(status: http::StatusCode) -> Self {
        match status.as_u16() {
            200..=399 => Self::success,
            401 => Self::unauthorized,
            404 => Self::not_found,
            400..=499 => Self::client_error,
            _ => Self::server_error,
        }
    }
}

/// Labels of mirror requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route.
    pub route: Route,
    /// The outcome.
    pub outcome: StatusClass,
}

/// Where served bytes came from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Source {
    /// A complete blob in the local store.
    store,
    /// A download in progress (stream-through), from upstream or from peers.
    download,
    /// The node's containerd content store.
    containerd,
    /// Straight from upstream without caching (no room in the store).
    passthrough,
}

/// Labels with a source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// The source.
    pub source: Source,
}

/// Kinds of cache lookups.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LookupKind {
    /// A blob or manifest by digest.
    digest,
    /// A tag.
    tag,
}

/// Cache lookup results.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LookupResult {
    /// Served from the store.
    hit,
    /// Joined a download already running on this node.
    in_flight,
    /// Had to go upstream.
    miss,
    /// A stale tag served because upstream was unreachable.
    stale,
    /// Served from the node's containerd.
    containerd,
}

/// Labels of cache lookups.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// What was looked up.
    pub kind: LookupKind,
    /// How it went.
    pub result: LookupResult,
}

/// Upstream request kinds.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamKind {
    /// Blob GET/HEAD.
    blob,
    /// Manifest GET/HEAD.
    manifest,
    /// Token endpoint.
    token,
}

/// Upstream request outcomes.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamOutcome {
    /// 2xx.
    ok,
    /// 404.
    not_found,
    /// 401/403.
    unauthorized,
    /// 5xx or 429 (retried if attempts remain).
    server_error,
    /// Connection error or timeout (retried if attempts remain).
    unreachable,
    /// Another status.
    other,
}

/// Labels of upstream requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The request kind.
    pub kind: UpstreamKind,
    /// The outcome.
    pub outcome: UpstreamOutcome,
}

/// Labels with only a kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The request kind.
    pub kind: UpstreamKind,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 12))
}

/// Mirror (HTTP surface) metrics.
#[derive(Debug, Clone, Default)]
pub struct MirrorMetrics {
    /// Requests by route and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes sent to clients by source.
    pub bytes_served: Family<SourceLabels, Counter>,
    /// Cache lookups.
    pub lookups: Family<LookupLabels, Counter>,
}

/// Upstream client metrics.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    /// Requests by kind and outcome (every attempt counts).
    pub requests: Family<UpstreamLabels, Counter>,
    /// Time to response headers.
    pub latency: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Body bytes received.
    pub bytes: Counter,
}

impl Default for UpstreamMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            bytes: Counter::default(),
        }
    }
}

/// containerd metrics.
#[derive(Debug, Clone, Default)]
pub struct ContainerdMetrics {
    /// 1 while the agent follows containerd's events, 0 while it cannot reach containerd.
    pub connected: Gauge,
    /// Blobs of containerd's images this node offers.
    pub blobs: Gauge,
    /// Events handled.
    pub events: Counter,
    /// Leases taken to read content.
    pub leases: Counter,
    /// Bytes read from containerd's content store.
    pub bytes_read: Counter,
}

/// Store metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    /// Bytes of complete blobs on disk.
    pub bytes: Gauge,
    /// Complete blobs on disk.
    pub blobs: Gauge,
    /// Blobs evicted by GC.
    pub evicted_blobs: Counter,
    /// Bytes evicted by GC.
    pub evicted_bytes: Counter,
    /// Downloads whose content did not match the digest.
    pub verify_failures: Counter,
    /// Downloads committed.
    pub commits: Counter,
}

/// Member states as this node sees them.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PeerState {
    /// Answers probes.
    alive,
    /// Answered no probe in a period: no longer a home or a source until it refutes.
    suspect,
    /// Did not refute a suspicion within `dead_after`, or left.
    dead,
}

/// Labels with a peer state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerStateLabels {
    /// The state.
    pub state: PeerState,
}

/// Why a transfer from or to a peer failed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TransferFailure {
    /// No connection could be made or kept (including a failed handshake).
    connect,
    /// The peer did not answer or stopped sending within the stall timeout.
    stall,
    /// A piece did not match its blake3 hash.
    hash_mismatch,
    /// The peer broke the protocol (bad frame, wrong length).
    protocol,
    /// The peer answered with an error (not held, busy).
    refused,
    /// Bytes from peers made up a blob whose sha256 did not match.
    digest_mismatch,
    /// A piece, or a member's piece table, contradicted what two members vouched for or upstream sent.
    table_mismatch,
}

/// Labels with a transfer failure reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The reason.
    pub reason: TransferFailure,
}

/// Peer mesh metrics.
#[derive(Debug, Clone, Default)]
pub struct MeshMetrics {
    /// Known members (other than this node) by state.
    pub peers: Family<PeerStateLabels, Gauge>,
    /// Piece bytes uploaded to peers.
    pub bytes_sent: Counter,
    /// Piece bytes received from peers (verified against their blake3 hash).
    pub bytes_received: Counter,
    /// Failed piece transfers and handshakes, by reason.
    pub failures: Family<FailureLabels, Counter>,
    /// Peers in quarantine now.
    pub quarantined: Gauge,
    /// Piece requests refused because the upload limit was reached.
    pub uploads_refused: Counter,
    /// Blobs this node is home for, as known to its directory.
    pub directory_digests: Gauge,
    /// Holder entries in this node's directory (over all its digests).
    pub directory_holders: Gauge,
    /// Incoming gossip connections refused (a wrong or missing cluster secret fails here).
    pub gossip_refused: Counter,
    /// Membership messages refused (undecodable, a bad signature, sent in another member's name, a full table).
    pub membership_refused: Counter,
    /// Open membership (gossip) connections.
    pub membership_connections: Gauge,
    /// Membership connections opened (each a TCP, pnet and noise handshake).
    pub membership_connections_opened: Counter,
    /// Changes of the member view (a member joined, left, became suspect or alive again).
    pub membership_view_changes: Counter,
    /// Lifeguard's local health score (0 healthy; each unit stretches the probe period by one more period).
    pub membership_local_health: Gauge,
    /// Membership message bytes sent (probes, gossip, tables; framing and handshakes not counted).
    pub membership_bytes_sent: Counter,
    /// Membership message bytes received.
    pub membership_bytes_received: Counter,
    /// Piece bytes received from members of another zone.
    pub bytes_received_cross_zone: Counter,
    /// Downloads this node ran as a home on another member's behalf (one per digest per zone in a burst).
    pub home_fetches: Counter,
}

/// All metrics of the agent.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Mirror.
    pub mirror: MirrorMetrics,
    /// Upstream.
    pub upstream: UpstreamMetrics,
    /// Store.
    pub store: StoreMetrics,
    /// Peer mesh.
    pub mesh: MeshMetrics,
    /// containerd.
    pub containerd: ContainerdMetrics,
}

impl Metrics {
    /// Creates every series of the labelled families at zero: a dashboard then shows 0 rather than "no data",
    /// and `rate()` sees the first increment.
    fn prime(&self) {
        use LookupKind as K;
        use LookupResult as L;
        use StatusClass as S;
        use UpstreamKind as U;
        use UpstreamOutcome as O;
        for route in [Route::base, Route::manifest, Route::blob, Route::other] {
            for outcome in [S::success, S::unauthorized, S::not_found, S::client_error, S::server_error, S::aborted] {
                drop(self.mirror.requests.get_or_create(&RequestLabels { route, outcome }));
            }
        }
        for source in [Source::store, Source::download, Source::containerd, Source::passthrough] {
            drop(self.mirror.bytes_served.get_or_create(&SourceLabels { source }));
        }
        for kind in [K::digest, K::tag] {
            for result in [L::hit, L::in_flight, L::miss, L::stale, L::containerd] {
                drop(self.mirror.lookups.get_or_create(&LookupLabels { kind, result }));
            }
        }
        for kind in [U::blob, U::manifest, U::token] {
            drop(self.upstream.latency.get_or_create(&KindLabels { kind }));
            for outcome in [O::ok, O::not_found, O::unauthorized, O::server_error, O::unreachable, O::other] {
                drop(self.upstream.requests.get_or_create(&UpstreamLabels { kind, outcome }));
            }
        }
        for state in [PeerState::alive, PeerState::suspect, PeerState::dead] {
            drop(self.mesh.peers.get_or_create(&PeerStateLabels { state }));
        }
        use TransferFailure as F;
        for reason in [F::connect, F::stall, F::hash_mismatch, F::protocol, F::refused, F::digest_mismatch] {
            drop(self.mesh.failures.get_or_create(&FailureLabels { reason }));
        }
    }

    /// Registers every metric under the `shoal` prefix.
    pub fn register(&self, registry: &mut Registry) {
        self.prime();
        let r = registry.sub_registry_with_prefix("shoal");
        r.register(
            "containerd_connected",
            "1 while containerd's events are followed",
            self.containerd.connected.clone(),
        );
        r.register("containerd_blobs", "Blobs of containerd's images offered", self.containerd.blobs.clone());
        r.register("containerd_events", "containerd events handled", self.containerd.events.clone());
        r.register("containerd_leases", "containerd leases taken to read content", self.containerd.leases.clone());
        r.register(
            "containerd_read_bytes",
            "Bytes read from containerd's content store",
            self.containerd.bytes_read.clone(),
        );
        r.register("http_requests", "Mirror requests by route and outcome", self.mirror.requests.clone());
        r.register(
            "bytes_served",
            "Blob and manifest bytes sent to clients, by source",
            self.mirror.bytes_served.clone(),
        );
        r.register("cache_lookups", "Cache lookups by kind and result", self.mirror.lookups.clone());
        r.register(
            "upstream_requests",
            "Upstream requests (each attempt) by kind and outcome",
            self.upstream.requests.clone(),
        );
        r.register("upstream_latency_seconds", "Time to upstream response headers", self.upstream.latency.clone());
        r.register("upstream_bytes", "Body bytes received from upstream", self.upstream.bytes.clone());
        r.register("store_bytes", "Bytes of complete blobs on disk", self.store.bytes.clone());
        r.register("store_blobs", "Complete blobs on disk", self.store.blobs.clone());
        r.register("gc_evicted_blobs", "Blobs evicted by GC", self.store.evicted_blobs.clone());
        r.register("gc_evicted_bytes", "Bytes evicted by GC", self.store.evicted_bytes.clone());
        r.register(
            "verify_failures",
            "Downloads discarded because they did not match their digest",
            self.store.verify_failures.clone(),
        );
        r.register("store_commits", "Downloads verified and committed", self.store.commits.clone());
        r.register("peers", "Known members other than this node, by state", self.mesh.peers.clone());
        r.register("peer_sent_bytes", "Piece bytes uploaded to peers", self.mesh.bytes_sent.clone());
        r.register(
            "peer_received_bytes",
            "Piece bytes received from peers and verified against their hash",
            self.mesh.bytes_received.clone(),
        );
        r.register("peer_transfer_failures", "Failed peer transfers by reason", self.mesh.failures.clone());
        r.register(
            "peers_quarantined",
            "Peers quarantined after their data failed a check",
            self.mesh.quarantined.clone(),
        );
        r.register(
            "peer_uploads_refused",
            "Piece requests refused because the upload limit was reached",
            self.mesh.uploads_refused.clone(),
        );
        r.register("directory_digests", "Digests this node is the home of", self.mesh.directory_digests.clone());
        r.register("directory_holders", "Holders known to this node's directory", self.mesh.directory_holders.clone());
        r.register(
            "gossip_refused_connections",
            "Incoming gossip connections refused (wrong or missing cluster secret, bad handshake)",
            self.mesh.gossip_refused.clone(),
        );
        r.register(
            "membership_refused_messages",
            "Membership messages refused (undecodable, bad signature, another member's name, table full)",
            self.mesh.membership_refused.clone(),
        );
        r.register("membership_connections", "Open membership connections", self.mesh.membership_connections.clone());
        r.register(
            "membership_connections_opened",
            "Membership connections opened (each a TCP, pnet and noise handshake)",
            self.mesh.membership_connections_opened.clone(),
        );
        r.register(
            "membership_view_changes",
            "Changes of the member view (joins, leaves, suspicions, refutations)",
            self.mesh.membership_view_changes.clone(),
        );
        r.register(
            "membership_local_health",
            "Local health score: 0 healthy; this node missed answers or had to refute, and probes more slowly",
            self.mesh.membership_local_health.clone(),
        );
        r.register(
            "membership_sent_bytes",
            "Membership message bytes sent (framing and handshakes not counted)",
            self.mesh.membership_bytes_sent.clone(),
        );
        r.register(
            "membership_received_bytes",
            "Membership message bytes received (framing and handshakes not counted)",
            self.mesh.membership_bytes_received.clone(),
        );
        r.register(
            "peer_received_cross_zone_bytes",
            "Piece bytes received from members of another zone",
            self.mesh.bytes_received_cross_zone.clone(),
        );
        r.register(
            "home_fetches",
            "Downloads started as a digest's home on another member's behalf",
            self.mesh.home_fetches.clone(),
        );
    }
}
