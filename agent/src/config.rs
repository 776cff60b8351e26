//! Configuration: a TOML file, `SHOAL_*` environment variables and command-line flags (in rising precedence),
//! read into [`RawConfig`] and converted once into the typed [`Config`] the agent runs with. Every check happens
//! in [`RawConfig::validate`], before any port is bound, and every error names the key and the reason.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(test)]
use raw::parse_registry_flag;
pub use raw::{RawConfig, RawRegistry, RegistryFlag};

use crate::containerd::{ContainerdConfig, ContentAccess};
use crate::oci::RegistryHost;

mod raw;

/// A configuration key that is missing, malformed or out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys or wrong types (the message names the key).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and position.
        message: String,
    },
    /// A key has a value that does not make sense.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The key, as written in the file (`registries."docker.io".endpoint`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Credentials the agent itself presents to a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// One upstream registry, validated.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Base URL, no trailing slash.
    pub endpoint: reqwest::Url,
    /// Credentials from `credentials_file`.
    pub credentials: Option<Credentials>,
    /// Other hosts whose token realm is followed.
    pub token_hosts: Vec<String>,
}

/// Docker Hub's token service.
const DOCKER_HUB_AUTH: &str = "auth.docker.io";

/// Upstream client settings, validated.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait between body chunks.
    pub stall_timeout: Duration,
    /// Longest wait for response headers.
    pub response_timeout: Duration,
    /// Attempts per request (≥ 1).
    pub attempts: u32,
    /// Configured registries.
    pub registries: BTreeMap<RegistryHost, RegistryConfig>,
    /// Whether other registries are proxied over HTTPS.
    pub allow_unlisted: bool,
    /// Registry for requests without `?ns=`.
    pub default_registry: Option<RegistryHost>,
}

/// The agent's configuration, validated: nothing in here can be invalid.
#[derive(Debug, Clone)]
pub struct Config {
    /// Mirror address.
    pub listen: SocketAddr,
    /// Metrics and health address.
    pub metrics_listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Cache budget in bytes.
    pub disk_budget: u64,
    /// Free bytes the data dir's file system keeps after a download.
    pub min_free_space: u64,
    /// Eviction starts above this many bytes.
    pub gc_high_bytes: u64,
    /// Eviction stops below this many bytes.
    pub gc_low_bytes: u64,
    /// Tag cache TTL.
    pub tag_ttl: Duration,
    /// Trust period of accepted client credentials for private content.
    pub auth_ttl: Duration,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Limits of the mirror's HTTP server.
    pub client_limits: crate::mirror::server::Limits,
    /// Where to write the bound addresses once ready.
    pub ready_file: Option<PathBuf>,
    /// The admin API's unix socket, if any.
    pub admin_socket: Option<PathBuf>,
    /// Follow and reconcile `ImageCache` objects.
    pub image_caches: bool,
    /// Prefetch the new images of workloads' rollouts.
    pub prefetch_rollouts: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Upstream client settings.
    pub upstream: UpstreamConfig,
    /// The peer mesh, when a cluster secret is configured.
    pub mesh: Option<MeshConfig>,
    /// The node's containerd, unless turned off.
    pub containerd: Option<ContainerdConfig>,
    /// Where to write containerd's hosts files, if anywhere.
    pub hosts: Option<HostsConfig>,
    /// This node's Kubernetes name.
    pub node_name: Option<String>,
}

/// Writing containerd's hosts files, validated.
#[derive(Debug, Clone)]
pub struct HostsConfig {
    /// The hosts dir.
    pub dir: PathBuf,
    /// The mirror's URL as containerd reaches it.
    pub mirror_url: String,
    /// containerd's connect timeout to the mirror.
    pub dial_timeout: Duration,
    /// containerd's config file (pre-flight checks).
    pub containerd_config: PathBuf,
}

/// The cluster's shared secret (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(pub Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Peer mesh settings, validated.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The shared secret.
    pub secret: ClusterSecret,
    /// Gossip listener (TCP).
    pub gossip_listen: SocketAddr,
    /// Transfer endpoint (UDP).
    pub transfer_listen: SocketAddr,
    /// The IP announced to other members.
    pub advertise_ip: std::net::IpAddr,
    /// `host:port` entries to dial.
    pub bootstrap: Vec<String>,
    /// mDNS discovery.
    pub mdns: bool,
    /// What members' identities are bound to.
    pub binding: MemberBinding,
    /// This node's zone.
    pub zone: String,
    /// Whether `zone` was left unset: with a node name, the node's zone label decides.
    pub zone_from_node: bool,
    /// Announcement period.
    pub gossip_interval: Duration,
    /// Silence after which a member is suspect.
    pub suspect_after: Duration,
    /// Silence after which a member is dead.
    pub dead_after: Duration,
    /// Concurrent piece uploads.
    pub max_uploads: usize,
    /// Upload cap in bytes per second (`None`: no cap).
    pub upload_rate: Option<u64>,
    /// How downloads take pieces from members.
    pub swarm: Swarm,
    /// Wait for a peer's answer or next bytes.
    pub peer_stall_timeout: Duration,
    /// Quarantine of a peer whose data failed a check.
    pub peer_quarantine: Duration,
}

impl RawConfig {
    /// Checks every key and builds the runtime configuration.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = parse_addr("listen", self.listen.as_deref().unwrap_or("127.0.0.1:30020"))?;
        let metrics_listen = parse_addr("metrics_listen", self.metrics_listen.as_deref().unwrap_or("127.0.0.1:30021"))?;
        if listen == metrics_listen && listen.port() != 0 {
            return Err(invalid("metrics_listen", "must differ from `listen`"));
        }
        let data_dir = self.data_dir.clone().unwrap_or_else(|| PathBuf::from("./shoal-data"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let disk_budget =
            parse_size(self.disk_budget.as_deref().unwrap_or("10GiB")).map_err(|r| invalid("disk_budget", r))?;
        if disk_budget < 1 << 20 {
            return Err(invalid("disk_budget", "must be at least 1MiB"));
        }
        let min_free_space =
            parse_size(self.min_free_space.as_deref().unwrap_or("256MiB")).map_err(|r| invalid("min_free_space", r))?;
        let high = self.gc_high_watermark.unwrap_or(0.9);
        let low = self.gc_low_watermark.unwrap_or(0.8);
        if !(high > 0.0 && high <= 1.0) {
            return Err(invalid("gc_high_watermark", "must be in (0, 1]"));
        }
        if !(low > 0.0 && low < high) {
            return Err(invalid("gc_low_watermark", "must be in (0, gc_high_watermark)"));
        }
        let dur = |key: &str, v: &Option<String>, default: &str, min: Duration| -> Result<Duration, ConfigError> {
            let d = humantime::parse_duration(v.as_deref().unwrap_or(default))
                .map_err(|e| invalid(key, format!("not a duration like `30s`: {e}")))?;
            if d < min {
                return Err(invalid(key, format!("must be at least {}", humantime::format_duration(min))));
            }
            Ok(d)
        };
        let tag_ttl = dur("tag_ttl", &self.tag_ttl, "30s", Duration::ZERO)?;
        let mesh = self.validate_mesh(&dur)?;
        let containerd = self.validate_containerd(&dur)?;
        let hosts = match &self.containerd_hosts_dir {
            None => None,
            Some(dir) if dir.as_os_str().is_empty() => None,
            Some(dir) => {
                let mirror_url = match &self.mirror_url {
                    Some(u) => {
                        let url = reqwest::Url::parse(u).map_err(|e| invalid("mirror_url", format!("`{u}`: {e}")))?;
                        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || url.path() != "/" {
                            return Err(invalid("mirror_url", "must be http(s)://HOST[:PORT] with no path"));
                        }
                        u.trim_end_matches('/').to_owned()
                    }
                    None => {
                        let ip = if listen.ip().is_unspecified() {
                            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                        } else {
                            listen.ip()
                        };
                        format!("http://{}", SocketAddr::new(ip, listen.port()))
                    }
                };
                Some(HostsConfig {
                    dir: dir.clone(),
                    mirror_url,
                    dial_timeout: dur(
                        "containerd_dial_timeout",
                        &self.containerd_dial_timeout,
                        "1s",
                        Duration::from_millis(10),
                    )?,
                    containerd_config: self
                        .containerd_config
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("/etc/containerd/config.toml")),
                })
            }
        };
        let node_name = match &self.node_name {
            Some(n) if !valid_node_name(n) => {
                return Err(invalid("node_name", "not a Kubernetes node name (a DNS subdomain: [a-z0-9.-], ≤ 253)"));
            }
            other => other.clone(),
        };

        let auth_ttl = dur("auth_ttl", &self.auth_ttl, "60s", Duration::ZERO)?;
        let shutdown_grace = dur("shutdown_grace", &self.shutdown_grace, "20s", Duration::ZERO)?;
        let max_connections = self.max_client_connections.unwrap_or(1024);
        if !(1..=65_536).contains(&max_connections) {
            return Err(invalid("max_client_connections", "must be between 1 and 65536"));
        }
        let client_limits = crate::mirror::server::Limits {
            max_connections: max_connections as usize,
            header_timeout: dur(
                "client_header_timeout",
                &self.client_header_timeout,
                "10s",
                Duration::from_millis(100),
            )?,
            stall_timeout: dur("client_stall_timeout", &self.client_stall_timeout, "30s", Duration::from_millis(100))?,
        };
        let connect_timeout =
            dur("upstream_connect_timeout", &self.upstream_connect_timeout, "5s", Duration::from_millis(10))?;
        let stall_timeout =
            dur("upstream_stall_timeout", &self.upstream_stall_timeout, "30s", Duration::from_millis(10))?;
        let response_timeout =
            dur("upstream_response_timeout", &self.upstream_response_timeout, "10s", Duration::from_millis(10))?;
        let attempts = self.upstream_attempts.unwrap_or(4);
        if !(1..=20).contains(&attempts) {
            return Err(invalid("upstream_attempts", "must be between 1 and 20"));
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log_format", format!("`{other}` is neither `text` nor `json`"))),
        };
        let default_registry = self
            .default_registry
            .as_deref()
            .map(|h| RegistryHost::parse(h).map_err(|_| invalid("default_registry", "not a host[:port]")))
            .transpose()?;

        let mut registries = BTreeMap::new();
        let tables = self.registry_tables.into_iter().map(|(h, r)| (h, r, true));
        let flags = self.registries.into_iter().map(|f| (f.host, f.raw, false));
        for (host, raw, from_file) in tables.chain(flags) {
            let key = if from_file { format!("registry.\"{host}\"") } else { format!("registry `{host}`") };
            let parsed = RegistryHost::parse(&host).map_err(|_| invalid(&key, "not a host[:port]"))?;
            registries.insert(parsed.clone(), validate_registry(&key, &parsed, raw)?);
        }
        let docker = RegistryHost::parse("docker.io").expect("docker.io is a valid host");
        registries.entry(docker).or_insert_with(|| RegistryConfig {
            endpoint: reqwest::Url::parse("https://registry-1.docker.io").expect("a valid URL"),
            credentials: None,
            token_hosts: vec![DOCKER_HUB_AUTH.to_owned()],
        });

        let image_caches = self.image_caches.unwrap_or(false);
        let prefetch_rollouts = self.prefetch_rollouts.unwrap_or(false);
        for (key, on) in [("image_caches", image_caches), ("prefetch_rollouts", prefetch_rollouts)] {
            if on && mesh.is_none() {
                return Err(invalid(
                    key,
                    "needs the mesh (`cluster_secret_file`): the images are placed at the zones' homes",
                ));
            }
        }
        let admin_socket = match &self.admin_socket {
            None => Some(data_dir.join("admin.sock")),
            Some(p) if p.as_os_str() == "off" => None,
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("admin_socket", "must not be empty (`off` for none)"));
            }
            Some(p) => Some(p.clone()),
        };
        Ok(Config {
            containerd,
            hosts,
            node_name,
            listen,
            metrics_listen,
            data_dir,
            disk_budget,
            min_free_space,
            gc_high_bytes: (disk_budget as f64 * high) as u64,
            gc_low_bytes: (disk_budget as f64 * low) as u64,
            tag_ttl,
            auth_ttl,
            shutdown_grace,
            client_limits,
            ready_file: self.ready_file.clone(),
            admin_socket,
            image_caches,
            prefetch_rollouts,
            log_format,
            upstream: UpstreamConfig {
                connect_timeout,
                stall_timeout,
                response_timeout,
                attempts,
                registries,
                allow_unlisted: self.allow_unlisted_registries.unwrap_or(true),
                default_registry,
            },
            mesh,
        })
    }

    fn validate_containerd(
        &self,
        dur: &impl Fn(&str, &Option<String>, &str, Duration) -> Result<Duration, ConfigError>,
    ) -> Result<Option<ContainerdConfig>, ConfigError> {
        let socket = self.containerd_socket.clone().unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"));
        if socket.as_os_str().is_empty() {
            return Ok(None);
        }
        let namespace = self.containerd_namespace.clone().unwrap_or_else(|| "k8s.io".to_owned());
        if namespace.is_empty()
            || namespace.len() > 76
            || !namespace.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid("containerd_namespace", "must be 1-76 characters of [A-Za-z0-9._-]"));
        }
        let access = match self.containerd_content_access.as_deref().unwrap_or("node") {
            "node" => ContentAccess::Node,
            "upstream" => ContentAccess::Upstream,
            other => {
                return Err(invalid(
                    "containerd_content_access",
                    format!("`{other}` is neither `node` nor `upstream`"),
                ));
            }
        };
        let resync = dur("containerd_resync", &self.containerd_resync, "5m", Duration::from_secs(1))?;
        Ok(Some(ContainerdConfig { socket, namespace, access, resync }))
    }

    fn validate_mesh(
        &self,
        dur: &impl Fn(&str, &Option<String>, &str, Duration) -> Result<Duration, ConfigError>,
    ) -> Result<Option<MeshConfig>, ConfigError> {
        let Some(path) = &self.cluster_secret_file else {
            for (key, set) in [
                ("gossip_listen", self.gossip_listen.is_some()),
                ("transfer_listen", self.transfer_listen.is_some()),
                ("bootstrap", !self.bootstrap.is_empty()),
            ] {
                if set {
                    return Err(invalid(key, "the mesh needs `cluster_secret_file` as well"));
                }
            }
            return Ok(None);
        };
        let secret = read_secret(path).map_err(|r| invalid("cluster_secret_file", r))?;
        let gossip_listen = parse_addr("gossip_listen", self.gossip_listen.as_deref().unwrap_or("0.0.0.0:30023"))?;
        let transfer_listen =
            parse_addr("transfer_listen", self.transfer_listen.as_deref().unwrap_or("0.0.0.0:30024"))?;
        let advertise_ip = match &self.advertise_ip {
            Some(ip) => {
                let ip: std::net::IpAddr =
                    ip.parse().map_err(|e| invalid("advertise_ip", format!("`{ip}` is not an IP address: {e}")))?;
                if ip.is_unspecified() {
                    return Err(invalid("advertise_ip", "must be an address other nodes can reach, not 0.0.0.0"));
                }
                ip
            }
            None if transfer_listen.ip().is_unspecified() || gossip_listen.ip().is_unspecified() => {
                return Err(invalid(
                    "advertise_ip",
                    "required when `gossip_listen` or `transfer_listen` binds an unspecified address",
                ));
            }
            None => transfer_listen.ip(),
        };
        for b in &self.bootstrap {
            let ok = b.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(invalid("bootstrap", format!("`{b}` is not host:port")));
            }
        }
        let zone = self.zone.clone().unwrap_or_else(|| "default".to_owned());
        if !valid_zone(&zone) {
            return Err(invalid("zone", "must be 1-63 characters of [A-Za-z0-9._-]"));
        }
        let binding = self.member_binding()?;
        let gossip_interval = dur("gossip_interval", &self.gossip_interval, "1s", Duration::from_millis(100))?;
        let suspect_after = dur("suspect_after", &self.suspect_after, "500ms", Duration::from_millis(20))?;
        let dead_after = dur("dead_after", &self.dead_after, "5s", Duration::from_millis(300))?;
        if suspect_after >= gossip_interval {
            return Err(invalid(
                "suspect_after",
                "must be shorter than `gossip_interval` (it is the probe's wait for a direct answer)",
            ));
        }
        if dead_after <= gossip_interval {
            return Err(invalid("dead_after", "must be longer than `gossip_interval`"));
        }
        let max_uploads = self.max_uploads.unwrap_or(16);
        if !(1..=1024).contains(&max_uploads) {
            return Err(invalid("max_uploads", "must be between 1 and 1024"));
        }
        let upload_rate =
            parse_size(self.upload_rate.as_deref().unwrap_or("0")).map_err(|r| invalid("upload_rate", r))?;
        if upload_rate != 0 && upload_rate < 64 << 10 {
            return Err(invalid("upload_rate", "must be 0 (no cap) or at least 64KiB"));
        }
        let swarm = match self.swarm.as_deref().unwrap_or("exchange") {
            "exchange" => Swarm::Exchange,
            "tree" => Swarm::Tree,
            _ => return Err(invalid("swarm", "must be `exchange` or `tree`")),
        };
        Ok(Some(MeshConfig {
            secret,
            gossip_listen,
            transfer_listen,
            advertise_ip,
            bootstrap: self.bootstrap.clone(),
            mdns: self.mdns.unwrap_or(false),
            binding,
            zone,
            zone_from_node: self.zone.is_none() && self.node_name.is_some(),
            gossip_interval,
            suspect_after,
            dead_after,
            max_uploads: max_uploads as usize,
            upload_rate: (upload_rate > 0).then_some(upload_rate),
            swarm,
            peer_stall_timeout: dur("peer_stall_timeout", &self.peer_stall_timeout, "5s", Duration::from_millis(50))?,
            peer_quarantine: dur("peer_quarantine", &self.peer_quarantine, "5m", Duration::ZERO)?,
        }))
    }
}

/// How a download takes pieces from members (`swarm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swarm {
    /// Any piece from any peer that has it, rarest first ([`crate::swarm::exchange`]); the home hands out peers in
    /// any order of arrival, and peers downloading the same blob trade both ways.
    Exchange,
    /// In order, from sources ahead of this node ([`crate::swarm::scheduler`]): a burst forms a tree.
    Tree,
}

/// What members' identities are bound to (see `member_binding`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberBinding {
    /// Any holder of the cluster secret, under any peer id.
    Open,
    /// The listed peer ids, each from its IP when one is given.
    List(HashMap<libp2p::PeerId, Option<std::net::IpAddr>>),
    /// Kubernetes Nodes: this node is `node`; members are checked against the API server's Nodes.
    Kubernetes {
        /// This node's name.
        node: String,
    },
}

impl RawConfig {
    fn member_binding(&self) -> Result<MemberBinding, ConfigError> {
        let default = if self.node_name.is_some() {
            "kubernetes"
        } else if self.members_file.is_some() {
            "list"
        } else {
            "open"
        };
        match self.member_binding.as_deref().unwrap_or(default) {
            "open" => Ok(MemberBinding::Open),
            "kubernetes" => match &self.node_name {
                Some(node) => Ok(MemberBinding::Kubernetes { node: node.clone() }),
                None => {
                    Err(invalid("member_binding", "`kubernetes` needs `node_name` (the downward API's spec.nodeName)"))
                }
            },
            "list" => {
                let Some(path) = &self.members_file else {
                    return Err(invalid("member_binding", "`list` needs `members_file`"));
                };
                parse_members(path).map(MemberBinding::List).map_err(|r| invalid("members_file", r))
            }
            other => Err(invalid("member_binding", format!("`{other}`: one of kubernetes, list, open"))),
        }
    }
}

/// Reads a members file: a peer id per line, optionally followed by an IP; `#` comments and blank lines skipped.
fn parse_members(path: &Path) -> Result<HashMap<libp2p::PeerId, Option<std::net::IpAddr>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(id), ip, None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("{}:{}: expected `PEER_ID [IP]`", path.display(), n + 1));
        };
        let id: libp2p::PeerId = id.parse().map_err(|e| format!("{}:{}: `{id}`: {e}", path.display(), n + 1))?;
        let ip = ip
            .map(|ip| ip.parse::<std::net::IpAddr>().map_err(|e| format!("{}:{}: `{ip}`: {e}", path.display(), n + 1)))
            .transpose()?;
        out.insert(id, ip);
    }
    if out.is_empty() {
        return Err(format!("{} lists no member", path.display()));
    }
    Ok(out)
}

/// Whether `name` can name a Kubernetes Node (a DNS subdomain: lowercase alphanumerics, `-` and `.`, at most 253
/// characters, starting and ending with an alphanumeric).
pub fn valid_node_name(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 253
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Whether `zone` can name a zone (the config key's rule, also applied to a node's label).
pub fn valid_zone(zone: &str) -> bool {
    !zone.is_empty() && zone.len() <= 63 && zone.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn read_secret(path: &Path) -> Result<ClusterSecret, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < 16 {
        return Err(format!("{} holds {} bytes; a cluster secret needs at least 16", path.display(), trimmed.len()));
    }
    Ok(ClusterSecret(trimmed.to_vec()))
}

fn validate_registry(key: &str, host: &RegistryHost, raw: RawRegistry) -> Result<RegistryConfig, ConfigError> {
    let plain_http = raw.plain_http.unwrap_or(false);
    let endpoint = match raw.endpoint {
        Some(e) => e,
        None if host.as_str() == "docker.io" => "https://registry-1.docker.io".to_owned(),
        None if plain_http => format!("http://{host}"),
        None => format!("https://{host}"),
    };
    let url = reqwest::Url::parse(endpoint.trim_end_matches('/'))
        .map_err(|e| invalid(format!("{key}.endpoint"), format!("not a URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if plain_http => {}
        "http" => return Err(invalid(format!("{key}.endpoint"), "is plain HTTP but `plain_http` is not set")),
        s => return Err(invalid(format!("{key}.endpoint"), format!("scheme `{s}` is not http or https"))),
    }
    if url.host_str().is_none() || url.query().is_some() || !url.username().is_empty() {
        return Err(invalid(format!("{key}.endpoint"), "must be scheme://host[:port][/path] without credentials"));
    }
    let credentials = raw
        .credentials_file
        .map(|path| read_credentials(&path).map_err(|r| invalid(format!("{key}.credentials_file"), r)))
        .transpose()?;
    let token_hosts = match raw.token_hosts {
        Some(hosts) => {
            for h in &hosts {
                if RegistryHost::parse(h).is_err() {
                    return Err(invalid(format!("{key}.token_hosts"), format!("`{h}` is not a host[:port]")));
                }
            }
            hosts
        }
        None if host.as_str() == "docker.io" => vec![DOCKER_HUB_AUTH.to_owned()],
        None => Vec::new(),
    };
    Ok(RegistryConfig { endpoint: url, credentials, token_hosts })
}

fn read_credentials(path: &Path) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or_default().trim_end_matches('\r');
    let (username, password) =
        line.split_once(':').ok_or_else(|| format!("{} must hold `username:password`", path.display()))?;
    if username.is_empty() {
        return Err(format!("{}: empty username", path.display()));
    }
    Ok(Credentials { username: username.to_owned(), password: password.to_owned() })
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    let err = |e: &dyn std::fmt::Display| invalid(key, format!("`{v}` is not an address like 127.0.0.1:30020: {e}"));
    match v.parse::<SocketAddr>() {
        Ok(a) => Ok(a),
        // An unbracketed IPv6 address and a port, as `$(HOST_IP):PORT` expands to on an IPv6 node.
        Err(e) => match v.rsplit_once(':').map(|(ip, port)| (ip.parse::<std::net::Ipv6Addr>(), port.parse::<u16>())) {
            Some((Ok(ip), Ok(port))) => Ok(SocketAddr::new(ip.into(), port)),
            _ => Err(err(&e)),
        },
    }
}

/// Parses a size like `10GiB`, `500MB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size like `20GiB`"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        "T" | "TB" => 1000u64.pow(4),
        "TiB" => 1 << 40,
        u => return Err(format!("unknown unit `{u}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<Config, String> {
        RawConfig::from_toml(toml)?.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_work() {
        let c = check("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:30020");
        assert_eq!(c.data_dir, PathBuf::from("./shoal-data"));
        let docker = RegistryHost::parse("docker.io").unwrap();
        assert_eq!(c.upstream.registries[&docker].endpoint.as_str(), "https://registry-1.docker.io/");
        assert_eq!(
            (c.upstream.response_timeout, c.upstream.stall_timeout),
            (Duration::from_secs(10), Duration::from_secs(30))
        );
        assert_eq!(c.min_free_space, 256 << 20);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("listen = \"nope\"", "`listen`"),
            ("disk_budget = \"12 parsecs\"", "`disk_budget`"),
            ("tag_ttl = \"soon\"", "`tag_ttl`"),
            ("min_free_space = \"lots\"", "`min_free_space`"),
            ("upstream_response_timeout = \"0s\"", "`upstream_response_timeout`"),
            ("gc_low_watermark = 0.95", "`gc_low_watermark`"),
            ("log_format = \"xml\"", "`log_format`"),
            ("[registry.\"r:5000\"]\nendpoint = \"http://r:5000\"", "registry.\"r:5000\".endpoint"),
            ("[registry.\"r:5000\"]\nendpoint = \"ftp://r\"", "registry.\"r:5000\".endpoint"),
            ("[registry.\"bad host\"]", "registry.\"bad host\""),
            ("[registry.\"r\"]\ncredentials_file = \"/nonexistent\"", "credentials_file"),
            ("bogus = 1", "bogus"),
            ("listen = 5", "listen"),
        ];
        for (toml, key) in cases {
            let err = check(toml).unwrap_err();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn flags_override_file() {
        let file = RawConfig::from_toml("listen = \"127.0.0.1:1\"\ndisk_budget = \"1GiB\"").unwrap();
        let flags = RawConfig { listen: Some("127.0.0.1:2".into()), ..RawConfig::default() };
        let c = flags.over(file).validate().unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.disk_budget, 1 << 30);
    }

    #[test]
    fn registry_flags_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("cred");
        std::fs::write(&cred, "alice:s3cr:et\n").unwrap();
        let flag = parse_registry_flag(&format!(
            "127.0.0.1:5000=http://127.0.0.1:5000;plain_http;credentials_file={}",
            cred.display()
        ))
        .unwrap();
        let c = RawConfig { registries: vec![flag], ..RawConfig::default() }.validate().unwrap();
        let r = &c.upstream.registries[&RegistryHost::parse("127.0.0.1:5000").unwrap()];
        assert_eq!(r.credentials.as_ref().unwrap().password, "s3cr:et");
        assert!(parse_registry_flag("x;bogus").is_err());
    }

    #[test]
    fn mesh_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny\n").unwrap();
        let with = |rest: &str| format!("cluster_secret_file = \"{}\"\n{rest}", secret.display());
        let c = check(&with("advertise_ip = \"10.0.0.5\"")).unwrap();
        let m = c.mesh.unwrap();
        assert_eq!(m.secret.0, b"0123456789abcdef0123456789abcdef");
        assert_eq!(m.gossip_listen.port(), 30023);
        assert_eq!((m.suspect_after, m.dead_after), (Duration::from_millis(500), Duration::from_secs(5)));
        assert!(format!("{m:?}").contains("ClusterSecret(..)"), "the secret is never printed");
        assert!(check("").unwrap().mesh.is_none());
        let cases = [
            ("bootstrap = [\"a:1\"]".to_owned(), "`bootstrap`"),
            (format!("cluster_secret_file = \"{}\"", short.display()), "`cluster_secret_file`"),
            (with(""), "`advertise_ip`"),
            (with("advertise_ip = \"0.0.0.0\""), "`advertise_ip`"),
            (
                with("gossip_listen = \"127.0.0.1:1\"\ntransfer_listen = \"127.0.0.1:2\"\nbootstrap = [\"nohost\"]"),
                "`bootstrap`",
            ),
            (with("advertise_ip = \"10.0.0.5\"\nzone = \"a zone\""), "`zone`"),
            (with("advertise_ip = \"10.0.0.5\"\ndead_after = \"1s\""), "`dead_after`"),
            (with("advertise_ip = \"10.0.0.5\"\nsuspect_after = \"3s\""), "`suspect_after`"),
            (with("advertise_ip = \"10.0.0.5\"\nmax_uploads = 0"), "`max_uploads`"),
            (with("advertise_ip = \"10.0.0.5\"\nupload_rate = \"1KiB\""), "`upload_rate`"),
            (with("advertise_ip = \"10.0.0.5\"\nswarm = \"torrent\""), "`swarm`"),
        ];
        for (toml, key) in cases {
            let err = check(&toml).unwrap_err();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1e99GiB").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn an_unbracketed_ipv6_host_ip_and_a_port_is_an_address() {
        let c = RawConfig::from_toml("metrics_listen = \"fd00::5:30021\"").unwrap().validate().unwrap();
        assert_eq!(c.metrics_listen, "[fd00::5]:30021".parse().unwrap());
        let e = RawConfig::from_toml("metrics_listen = \"fd00::5\"").unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("metrics_listen"), "{e}");
    }
}
