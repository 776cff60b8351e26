//! The configuration as written (the file, the environment, the flags: every key optional) and how the three are
//! merged; [`super`] checks it into the runtime [`super::Config`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use super::ConfigError;

/// The configuration as written: every field optional, so the file, the environment and the flags can be merged.
/// The flag and env var of each key share its name (`disk_budget` is `--disk-budget` and `SHOAL_DISK_BUDGET`).
#[derive(Debug, Default, Clone, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the registry mirror that containerd talks to. Default `127.0.0.1:30020`.
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`. Default `127.0.0.1:30021`.
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Where blobs and the index live. Default `./shoal-data`.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Disk space the cache may use, e.g. `20GiB`. Default `10GiB`.
    #[arg(long, env = "SHOAL_DISK_BUDGET")]
    pub disk_budget: Option<String>,
    /// Free space the data dir's file system must keep after a download, e.g. `1GiB`: a blob that does not fit
    /// is served through from upstream without being cached. Default `256MiB`.
    #[arg(long, env = "SHOAL_MIN_FREE_SPACE")]
    pub min_free_space: Option<String>,
    /// Eviction starts when the cache exceeds this share of the budget. Default `0.9`.
    #[arg(long, env = "SHOAL_GC_HIGH_WATERMARK")]
    pub gc_high_watermark: Option<f64>,
    /// Eviction stops when the cache is below this share of the budget. Default `0.8`.
    #[arg(long, env = "SHOAL_GC_LOW_WATERMARK")]
    pub gc_low_watermark: Option<f64>,
    /// How long a tag → digest answer is used before asking upstream again, e.g. `30s`. Default `30s`.
    #[arg(long, env = "SHOAL_TAG_TTL")]
    pub tag_ttl: Option<String>,
    /// How long a client's credentials, once accepted by upstream for a private repository, are trusted for
    /// cached content of that repository. Default `60s`.
    #[arg(long, env = "SHOAL_AUTH_TTL")]
    pub auth_ttl: Option<String>,
    /// How long in-flight responses may drain after SIGTERM. Keep it below the pod's grace period. Default `20s`.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Client connections the mirror keeps open at once; accepting pauses at the cap. Default `1024`.
    #[arg(long, env = "SHOAL_MAX_CLIENT_CONNECTIONS")]
    pub max_client_connections: Option<u32>,
    /// A client must send a request's headers within this, and an idle keep-alive connection is closed after it.
    /// Default `10s`.
    #[arg(long, env = "SHOAL_CLIENT_HEADER_TIMEOUT")]
    pub client_header_timeout: Option<String>,
    /// A response the client reads nothing of for this long is dropped. Default `30s`.
    #[arg(long, env = "SHOAL_CLIENT_STALL_TIMEOUT")]
    pub client_stall_timeout: Option<String>,
    /// Once ready, write where the agent listens (JSON: `mirror`, `metrics`, `gossip`, `transfer`) to this file:
    /// for supervisors and tests that let the OS pick ports (`:0`). Default none.
    #[arg(long, env = "SHOAL_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// The admin API's unix socket (mode 0600; the `shoal` CLI's `--socket`). Default `<data_dir>/admin.sock`;
    /// `off` for none.
    #[arg(long, env = "SHOAL_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Follow the cluster's `ImageCache` objects (`shoal.dev/v1alpha1`) and, on the agent that is the home of an
    /// object's name, preheat, pin and report them. Needs the mesh and the Kubernetes API. Default `false` (the
    /// chart: `true`).
    #[arg(long, env = "SHOAL_IMAGE_CACHES")]
    pub image_caches: Option<bool>,
    /// When a Deployment's, StatefulSet's or DaemonSet's pod template names a new image, have each zone fetch it
    /// once before the kubelets ask (one agent per zone watches the workloads). Needs the mesh and the Kubernetes
    /// API (read-only on those kinds). Default `false`.
    #[arg(long, env = "SHOAL_PREFETCH_ROLLOUTS")]
    pub prefetch_rollouts: Option<bool>,
    /// Timeout for connecting to an upstream registry. Default `5s`.
    #[arg(long, env = "SHOAL_UPSTREAM_CONNECT_TIMEOUT")]
    pub upstream_connect_timeout: Option<String>,
    /// Longest wait between two chunks of an upstream body. Default `30s`.
    #[arg(long, env = "SHOAL_UPSTREAM_STALL_TIMEOUT")]
    pub upstream_stall_timeout: Option<String>,
    /// Longest wait for an upstream response's headers once connected (a registry that accepts connections and
    /// never answers is found down after this, per attempt). Default `10s`.
    #[arg(long, env = "SHOAL_UPSTREAM_RESPONSE_TIMEOUT")]
    pub upstream_response_timeout: Option<String>,
    /// Attempts per upstream request on connection errors and 5xx answers (with backoff). Default `4`.
    #[arg(long, env = "SHOAL_UPSTREAM_ATTEMPTS")]
    pub upstream_attempts: Option<u32>,
    /// Registry used when a request carries no `?ns=`. Default none (such requests get 404).
    #[arg(long, env = "SHOAL_DEFAULT_REGISTRY")]
    pub default_registry: Option<String>,
    /// Whether registries absent from `registries` are proxied (over HTTPS). Default `true`.
    #[arg(long, env = "SHOAL_ALLOW_UNLISTED_REGISTRIES")]
    pub allow_unlisted_registries: Option<bool>,
    /// Log format: `text` or `json`. Default `text`. The level comes from `SHOAL_LOG` (EnvFilter syntax).
    #[arg(long, env = "SHOAL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Per-registry settings, keyed by the host containerd names (`docker.io`, `127.0.0.1:5000`). As a flag or env
    /// var: `HOST=ENDPOINT[;plain_http][;credentials_file=PATH]`, repeated or comma-separated.
    #[arg(long = "registry", env = "SHOAL_REGISTRIES", value_delimiter = ',', value_parser = parse_registry_flag)]
    #[serde(skip)]
    pub registries: Vec<RegistryFlag>,
    #[arg(skip)]
    #[serde(rename = "registry", default)]
    pub(super) registry_tables: BTreeMap<String, RawRegistry>,
    /// A file holding the cluster's shared secret (at least 16 bytes; in Kubernetes a mounted Secret). Setting it
    /// turns the peer mesh on; only nodes with the same secret can join it or exchange bytes. Default none (no
    /// mesh: a node-local mirror only).
    #[arg(long, env = "SHOAL_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Address of the gossip listener (TCP). Default `0.0.0.0:30023`.
    #[arg(long, env = "SHOAL_GOSSIP_LISTEN")]
    pub gossip_listen: Option<String>,
    /// Address of the transfer endpoint (QUIC, UDP). Default `0.0.0.0:30024`.
    #[arg(long, env = "SHOAL_TRANSFER_LISTEN")]
    pub transfer_listen: Option<String>,
    /// The IP other nodes reach this one at (in Kubernetes the node's IP). Required when a mesh listener binds an
    /// unspecified address (`0.0.0.0`); defaults to the listeners' own IP otherwise.
    #[arg(long, env = "SHOAL_ADVERTISE_IP")]
    pub advertise_ip: Option<String>,
    /// Where to find other members: `host:port` of their gossip listeners, names resolved again every few
    /// seconds (in Kubernetes the agents' headless Service), repeated or comma-separated. Default none.
    #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Also discover members on the local network by mDNS. Default `false`.
    #[arg(long, env = "SHOAL_MDNS")]
    pub mdns: Option<bool>,
    /// What a member's identity is bound to: `kubernetes` (its Node, checked against the API server: the default
    /// with `node_name`), `list` (the peer ids in `members_file`: the default with it), or `open` (any holder of
    /// the cluster secret, under any id: the default otherwise).
    #[arg(long, env = "SHOAL_MEMBER_BINDING")]
    pub member_binding: Option<String>,
    /// With `member_binding = "list"`: a file of members' peer ids, one per line, each optionally followed by the
    /// IP it must come from (`12D3KooW… 10.0.0.5`); `#` starts a comment.
    #[arg(long, env = "SHOAL_MEMBERS_FILE")]
    pub members_file: Option<PathBuf>,
    /// This node's zone: digests get a home per zone. Default `default`.
    #[arg(long, env = "SHOAL_ZONE")]
    pub zone: Option<String>,
    /// Membership's probe period: each node probes one member this often. Default `1s`.
    #[arg(long, env = "SHOAL_GOSSIP_INTERVAL")]
    pub gossip_interval: Option<String>,
    /// How long a probed member has to answer before others are asked to probe it; a member that answers none of
    /// them by the end of the period is suspect (no longer a home or source). Shorter than `gossip_interval`.
    /// Default `500ms`.
    #[arg(long, env = "SHOAL_SUSPECT_AFTER")]
    pub suspect_after: Option<String>,
    /// A suspect member that does not refute the suspicion within this is dead (forgotten by the directory).
    /// Default `5s`.
    #[arg(long, env = "SHOAL_DEAD_AFTER")]
    pub dead_after: Option<String>,
    /// Pieces this node uploads to peers at once; further requests are told to ask elsewhere. Default `16`.
    #[arg(long, env = "SHOAL_MAX_UPLOADS")]
    pub max_uploads: Option<u32>,
    /// Upload bandwidth cap towards peers per second, e.g. `200MiB`; `0` for none. Default `0`.
    #[arg(long, env = "SHOAL_UPLOAD_RATE")]
    pub upload_rate: Option<String>,
    /// How a download takes pieces from members: `exchange` (any piece from any peer that has it, rarest first,
    /// peers trading both ways) or `tree` (in order, from sources ahead of it). Default `exchange`.
    #[arg(long, env = "SHOAL_SWARM")]
    pub swarm: Option<String>,
    /// Longest wait for a peer's answer, and for all of a piece's bytes, before the piece is fetched elsewhere (a
    /// source too slow to deliver a piece in this time is dropped). Default `5s`.
    #[arg(long, env = "SHOAL_PEER_STALL_TIMEOUT")]
    pub peer_stall_timeout: Option<String>,
    /// How long a peer whose data failed a check is not asked for anything. Default `5m`.
    #[arg(long, env = "SHOAL_PEER_QUARANTINE")]
    pub peer_quarantine: Option<String>,
    /// containerd's gRPC socket: the blobs of its images are served to clients and peers without a second copy.
    /// An empty value turns this off. Default `/run/containerd/containerd.sock`.
    #[arg(long, env = "SHOAL_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// The containerd namespace whose images are shared. Default `k8s.io` (the kubelet's).
    #[arg(long, env = "SHOAL_CONTAINERD_NAMESPACE")]
    pub containerd_namespace: Option<String>,
    /// Who may be given containerd's content: `node` (any client of this mirror and any member, as Kubernetes
    /// lets any pod run an image present on its node) or `upstream` (clients upstream accepts for the
    /// repository; offered to peers as private content). Default `node`.
    #[arg(long, env = "SHOAL_CONTAINERD_CONTENT_ACCESS")]
    pub containerd_content_access: Option<String>,
    /// How often all of containerd's images are walked again (events keep the view current in between).
    /// Default `5m`.
    #[arg(long, env = "SHOAL_CONTAINERD_RESYNC")]
    pub containerd_resync: Option<String>,
    /// containerd's hosts dir (its registry `config_path`). When set, the agent writes `hosts.toml` there at
    /// start for every configured registry (and `_default` when unlisted registries are allowed), with this
    /// mirror first; `shoal restore-hosts` undoes it. Default none (containerd's config is left alone).
    #[arg(long, env = "SHOAL_CONTAINERD_HOSTS_DIR")]
    pub containerd_hosts_dir: Option<PathBuf>,
    /// How long containerd tries to connect to this mirror before it goes to the registry. Default `1s`.
    #[arg(long, env = "SHOAL_CONTAINERD_DIAL_TIMEOUT")]
    pub containerd_dial_timeout: Option<String>,
    /// containerd's config file, checked at start for settings that bypass the hosts files. Default
    /// `/etc/containerd/config.toml`.
    #[arg(long, env = "SHOAL_CONTAINERD_CONFIG")]
    pub containerd_config: Option<PathBuf>,
    /// The URL containerd reaches this mirror at, written into `hosts.toml`. Default `http://` + `listen` (with
    /// `127.0.0.1` for an unspecified address).
    #[arg(long, env = "SHOAL_MIRROR_URL")]
    pub mirror_url: Option<String>,
    /// This node's Kubernetes name (from the downward API). With the mesh on and no `zone` set, the zone is read
    /// from the node's `topology.kubernetes.io/zone` label. Default none.
    #[arg(long, env = "SHOAL_NODE_NAME")]
    pub node_name: Option<String>,
}

/// One registry given on the command line or in `SHOAL_REGISTRIES`.
#[derive(Debug, Clone)]
pub struct RegistryFlag {
    pub(super) host: String,
    pub(super) raw: RawRegistry,
}

pub(super) fn parse_registry_flag(s: &str) -> Result<RegistryFlag, String> {
    let mut parts = s.split(';');
    let head = parts.next().unwrap_or_default();
    let (host, endpoint) = match head.split_once('=') {
        Some((h, e)) => (h, Some(e.to_owned())),
        None => (head, None),
    };
    let mut raw = RawRegistry { endpoint, ..RawRegistry::default() };
    for p in parts {
        match p.split_once('=') {
            None if p == "plain_http" => raw.plain_http = Some(true),
            Some(("credentials_file", path)) => raw.credentials_file = Some(PathBuf::from(path)),
            Some(("token_host", h)) => raw.token_hosts.get_or_insert_with(Vec::new).push(h.to_owned()),
            _ => {
                return Err(format!(
                    "unknown registry option `{p}` (expected plain_http, credentials_file=PATH or token_host=HOST)"
                ));
            }
        }
    }
    Ok(RegistryFlag { host: host.to_owned(), raw })
}

/// Settings of one upstream registry, `[registry."HOST"]` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    /// Base URL of the registry's API, e.g. `https://registry-1.docker.io`. Default `https://HOST`
    /// (`http://HOST` with `plain_http`); `docker.io` maps to `https://registry-1.docker.io`.
    pub endpoint: Option<String>,
    /// Allow plain HTTP to this registry. Default `false`.
    pub plain_http: Option<bool>,
    /// A file holding `username:password` for Basic auth or the token flow. Default none (anonymous).
    pub credentials_file: Option<PathBuf>,
    /// Hosts (`host` or `host:port`) besides the endpoint's whose token realm the agent follows, with the
    /// configured credentials. Default none (`["auth.docker.io"]` for `docker.io`): a realm elsewhere is not
    /// followed, so a registry cannot make the agent call other services.
    pub token_hosts: Option<Vec<String>>,
}

impl RawConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Layers `self` (flags and env, higher precedence) over `file`.
    pub fn over(self, file: Self) -> Self {
        let mut registries = file.registries;
        registries.extend(self.registries);
        let mut registry_tables = file.registry_tables;
        registry_tables.extend(self.registry_tables);
        Self {
            listen: self.listen.or(file.listen),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            data_dir: self.data_dir.or(file.data_dir),
            disk_budget: self.disk_budget.or(file.disk_budget),
            min_free_space: self.min_free_space.or(file.min_free_space),
            gc_high_watermark: self.gc_high_watermark.or(file.gc_high_watermark),
            gc_low_watermark: self.gc_low_watermark.or(file.gc_low_watermark),
            tag_ttl: self.tag_ttl.or(file.tag_ttl),
            auth_ttl: self.auth_ttl.or(file.auth_ttl),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace),
            max_client_connections: self.max_client_connections.or(file.max_client_connections),
            client_header_timeout: self.client_header_timeout.or(file.client_header_timeout),
            client_stall_timeout: self.client_stall_timeout.or(file.client_stall_timeout),
            ready_file: self.ready_file.or(file.ready_file),
            admin_socket: self.admin_socket.or(file.admin_socket),
            image_caches: self.image_caches.or(file.image_caches),
            prefetch_rollouts: self.prefetch_rollouts.or(file.prefetch_rollouts),
            upstream_connect_timeout: self.upstream_connect_timeout.or(file.upstream_connect_timeout),
            upstream_stall_timeout: self.upstream_stall_timeout.or(file.upstream_stall_timeout),
            upstream_response_timeout: self.upstream_response_timeout.or(file.upstream_response_timeout),
            upstream_attempts: self.upstream_attempts.or(file.upstream_attempts),
            default_registry: self.default_registry.or(file.default_registry),
            allow_unlisted_registries: self.allow_unlisted_registries.or(file.allow_unlisted_registries),
            log_format: self.log_format.or(file.log_format),
            registries,
            registry_tables,
            cluster_secret_file: self.cluster_secret_file.or(file.cluster_secret_file),
            gossip_listen: self.gossip_listen.or(file.gossip_listen),
            transfer_listen: self.transfer_listen.or(file.transfer_listen),
            advertise_ip: self.advertise_ip.or(file.advertise_ip),
            bootstrap: if self.bootstrap.is_empty() { file.bootstrap } else { self.bootstrap },
            mdns: self.mdns.or(file.mdns),
            member_binding: self.member_binding.or(file.member_binding),
            members_file: self.members_file.or(file.members_file),
            zone: self.zone.or(file.zone),
            gossip_interval: self.gossip_interval.or(file.gossip_interval),
            suspect_after: self.suspect_after.or(file.suspect_after),
            dead_after: self.dead_after.or(file.dead_after),
            max_uploads: self.max_uploads.or(file.max_uploads),
            upload_rate: self.upload_rate.or(file.upload_rate),
            swarm: self.swarm.or(file.swarm),
            peer_stall_timeout: self.peer_stall_timeout.or(file.peer_stall_timeout),
            peer_quarantine: self.peer_quarantine.or(file.peer_quarantine),
            containerd_socket: self.containerd_socket.or(file.containerd_socket),
            containerd_namespace: self.containerd_namespace.or(file.containerd_namespace),
            containerd_content_access: self.containerd_content_access.or(file.containerd_content_access),
            containerd_resync: self.containerd_resync.or(file.containerd_resync),
            containerd_hosts_dir: self.containerd_hosts_dir.or(file.containerd_hosts_dir),
            containerd_dial_timeout: self.containerd_dial_timeout.or(file.containerd_dial_timeout),
            containerd_config: self.containerd_config.or(file.containerd_config),
            mirror_url: self.mirror_url.or(file.mirror_url),
            node_name: self.node_name.or(file.node_name),
        }
    }
}
