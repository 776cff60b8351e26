//! Child processes of the testbed: `shoal agent` and `containerd` (+ `ctr`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::Digest as _;

use crate::{shoal_bin, wait_for};

/// Builds an [`Agent`].
#[derive(Debug, Default)]
pub struct AgentBuilder {
    lines: Vec<String>,
    registries: Vec<String>,
    /// The address the mesh listens on, when in one (the port is the OS's pick).
    gossip_ip: Option<std::net::Ipv4Addr>,
    gossip_port: u16,
    netns: Option<(String, std::net::Ipv4Addr)>,
    env: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
}

impl AgentBuilder {
    /// Proxies `host` over plain HTTP (to `http://host`).
    pub fn registry(mut self, host: &str) -> Self {
        self.registries.push(format!("[registry.\"{host}\"]\nplain_http = true\n"));
        self
    }

    /// Proxies `host` over plain HTTP from another server, `endpoint` (`ip:port`), replacing any earlier setting for
    /// `host`: a node whose idea of a registry differs from everyone else's.
    pub fn registry_at(mut self, host: &str, endpoint: &str) -> Self {
        let table = format!("[registry.\"{host}\"]");
        self.registries.retain(|r| !r.starts_with(&table));
        self.registries.push(format!("{table}\nendpoint = \"http://{endpoint}\"\nplain_http = true\n"));
        self
    }

    /// Proxies `host` over plain HTTP with credentials from a file holding `user:password`.
    pub fn registry_with_credentials(mut self, host: &str, credentials_file: &Path) -> Self {
        self.registries.push(format!(
            "[registry.\"{host}\"]\nplain_http = true\ncredentials_file = \"{}\"\n",
            credentials_file.display()
        ));
        self
    }

    /// Adds a top-level config line, e.g. `("tag_ttl", "\"1s\"")` (the value in TOML syntax).
    pub fn setting(mut self, key: &str, toml_value: &str) -> Self {
        self.lines.push(format!("{key} = {toml_value}"));
        self
    }

    /// Joins the peer mesh with the secret in `secret_file`, listening on `ip` (a distinct 127.0.0.x per agent),
    /// bootstrapping from `bootstrap` (gossip addresses of other agents). Liveness timing is shortened for tests
    /// (production probing: every 1s, a direct answer within 500ms — faster probing made busy nodes flap during bursts; dead 2s after a suspicion) unless the test sets those keys.
    pub fn mesh(mut self, secret_file: &Path, ip: std::net::Ipv4Addr, bootstrap: &[SocketAddr]) -> Self {
        self.gossip_ip = Some(ip);
        let list: Vec<String> = bootstrap.iter().map(|a| format!("\"{a}\"")).collect();
        self.lines.push(format!("cluster_secret_file = \"{}\"", secret_file.display()));
        self.lines.push(format!("transfer_listen = \"{ip}:0\""));
        self.lines.push(format!("bootstrap = [{}]", list.join(", ")));
        for (key, value) in [("gossip_interval", "\"1s\""), ("suspect_after", "\"500ms\""), ("dead_after", "\"2s\"")] {
            if !self.lines.iter().any(|l| l.starts_with(&format!("{key} ="))) {
                self.lines.push(format!("{key} = {value}"));
            }
        }
        self
    }

    /// Listens for gossip on this port (of the address [`Self::mesh`] set) instead of one the OS picks: the address
    /// is then known before the agent starts, so agents started at once can bootstrap from each other.
    pub fn gossip_port(mut self, port: u16) -> Self {
        self.gossip_port = port;
        self
    }

    /// Runs the agent inside network namespace `ns` (address `ip`): the mirror on the namespace's loopback, the
    /// metrics on `ip` (so the harness can read them), the mesh on `ip` (set with [`AgentBuilder::mesh`]).
    pub fn netns(mut self, ns: &crate::netns::Netns) -> Self {
        self.netns = Some((ns.name().to_owned(), ns.ip()));
        self
    }

    /// Shares what `containerd` holds (its test namespace) through this agent.
    pub fn containerd(mut self, containerd: &Containerd) -> Self {
        self.lines.push(format!("containerd_socket = \"{}\"", containerd.socket().display()));
        self.lines.push(format!("containerd_namespace = \"{NAMESPACE}\""));
        self
    }

    /// Keeps the data in `dir` (a small file system, say) instead of the agent's own temporary directory.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_owned());
        self
    }

    /// Sets an environment variable of the agent's process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the agent and waits until it is ready. Its ports are the OS's picks (no race for free ports): the
    /// agent writes them to its ready file, and a restart binds the same ones again.
    pub async fn start(self) -> Result<Agent> {
        let dir = tempfile::Builder::new().prefix("shoal-agent").tempdir()?;
        let metrics_ip = self.netns.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |(_, ip)| *ip);
        let data_dir = self.data_dir.clone().unwrap_or_else(|| dir.path().join("data"));
        let mut config = format!("data_dir = \"{}\"\n", data_dir.display());
        // Testbed defaults, unless the test set the key itself.
        let defaults = [
            ("upstream_connect_timeout", "\"1s\""),
            ("upstream_stall_timeout", "\"5s\""),
            ("upstream_response_timeout", "\"3s\""),
            ("upstream_attempts", "2"),
            ("shutdown_grace", "\"5s\""),
            ("peer_stall_timeout", "\"2s\""),
            // Never the machine's own containerd: only one a test started and passed in.
            ("containerd_socket", "\"\""),
        ];
        for (key, value) in defaults {
            if key == "peer_stall_timeout" && self.gossip_ip.is_none() {
                continue;
            }
            if !self.lines.iter().any(|l| l.starts_with(&format!("{key} ="))) {
                config.push_str(&format!("{key} = {value}\n"));
            }
        }
        for l in &self.lines {
            config.push_str(l);
            config.push('\n');
        }
        let mut registries = String::new();
        for r in &self.registries {
            registries.push_str(r);
        }
        let mut agent = Agent {
            child: None,
            config_path: dir.path().join("shoal.toml"),
            dir,
            addr: SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0),
            metrics_addr: SocketAddr::new(metrics_ip.into(), 0),
            gossip_addr: self.gossip_ip.map(|ip| SocketAddr::new(ip.into(), self.gossip_port)),
            config,
            registries,
            http: reqwest::Client::builder().no_proxy().build()?,
            netns: self.netns.map(|(n, _)| n),
            env: self.env,
            data_dir,
        };
        agent.spawn().await?;
        Ok(agent)
    }
}

/// What the agent writes to its `ready_file` (`shoal_agent::agent::Addrs`).
#[derive(Debug, serde::Deserialize)]
struct ReadyFile {
    mirror: SocketAddr,
    metrics: SocketAddr,
    gossip: Option<SocketAddr>,
}

/// A running `shoal agent`.
#[derive(Debug)]
pub struct Agent {
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
    /// Mirror address.
    pub addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Gossip address, when in a mesh.
    pub gossip_addr: Option<SocketAddr>,
    config_path: PathBuf,
    /// The config file but for the listeners and the ready file (written at each start, with the ports bound).
    config: String,
    /// The `[registry."…"]` tables, after the top-level keys.
    registries: String,
    http: reqwest::Client,
    netns: Option<String>,
    env: Vec<(String, String)>,
    data_dir: PathBuf,
}

impl Agent {
    /// A builder.
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    fn ready_path(&self) -> PathBuf {
        self.dir.path().join("ready.json")
    }

    /// Starts the process on the addresses it has (port 0 the first time) and waits for its ready file, which says
    /// the addresses it bound.
    async fn spawn(&mut self) -> Result<()> {
        let mut config = format!("listen = \"{}\"\nmetrics_listen = \"{}\"\n", self.addr, self.metrics_addr);
        if let Some(g) = self.gossip_addr {
            config.push_str(&format!("gossip_listen = \"{g}\"\n"));
        }
        let ready = self.ready_path();
        config.push_str(&format!("ready_file = \"{}\"\n", ready.display()));
        config.push_str(&self.config);
        config.push_str(&self.registries);
        std::fs::write(&self.config_path, config)?;
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin()?);
                c
            }
            None => tokio::process::Command::new(shoal_bin()?),
        };
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .env("SHOAL_LOG", "info,shoal_agent=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting shoal agent")?;
        self.child = Some(child);
        let child = self.child.as_mut().expect("spawned just above");
        let mut bound: Option<ReadyFile> = None;
        let res = wait_for("the agent to be ready", Duration::from_secs(30), async || {
            bound = std::fs::read(&ready).ok().and_then(|b| serde_json::from_slice(&b).ok());
            // An agent that exited (a bad config) will never be ready: stop waiting.
            bound.is_some() || matches!(child.try_wait(), Ok(Some(_)))
        })
        .await;
        let exited = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
        let Some(bound) = bound.filter(|_| res.is_ok() && !exited) else {
            bail!("agent did not become ready; log:\n{}", self.log());
        };
        self.addr = bound.mirror;
        self.metrics_addr = bound.metrics;
        self.gossip_addr = bound.gossip;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The agent's peer id (as it logs it at start).
    pub fn peer_id(&self) -> Option<String> {
        let log = self.log();
        let at = log.find("local_peer_id=")? + "local_peer_id=".len();
        Some(log[at..].chars().take_while(char::is_ascii_alphanumeric).collect())
    }

    /// `shoal ARGS --socket <this agent's admin socket>` (the real CLI): (exit success, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = tokio::process::Command::new(shoal_bin()?)
            .args(args)
            .arg("--socket")
            .arg(self.data_dir.join("admin.sock"))
            .output()
            .await?;
        Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
    }

    /// `shoal ARGS -o json`, which must succeed: its output.
    pub async fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let (ok, out, err) = self.cli(&all).await?;
        anyhow::ensure!(ok, "shoal {args:?} failed: {err}\n{}", self.log());
        Ok(serde_json::from_str(&out)?)
    }

    /// `http://ADDR`, the mirror's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.metrics_addr);
        match self.http.get(&url).send().await {
            Ok(r) => Ok(r.text().await?),
            // A kept-alive connection the agent closed as idle just as it was reused: once more, on a new one.
            Err(e) if e.is_request() || e.is_connect() => Ok(self.http.get(&url).send().await?.text().await?),
            Err(e) => Err(e.into()),
        }
    }

    /// Sum of the samples of metric `name` (the full sample name, e.g. `shoal_bytes_served_total`) whose labels
    /// contain every one of `labels` (e.g. `source="download"`).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let text = self.metrics().await?;
        let mut sum = 0.0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or((line, "0"));
            let (n, l) = series.split_once('{').unwrap_or((series, ""));
            if n == name && labels.iter().all(|want| l.contains(want)) {
                sum += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok(sum)
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether the process is still running (false once it exited, or after [`Agent::kill`]).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, no cleanup.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// SIGTERM, then waits for the exit (at most `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("agent not running")?;
        let pid = c.id().context("agent already reaped")?;
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        Ok(tokio::time::timeout(timeout, c.wait()).await.context("agent did not exit after SIGTERM")??)
    }

    /// Starts the agent again with the same config, ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.spawn().await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Failing tests show the agent's log: set SHOAL_TEST_LOGS=1 (or it is shown on a panic).
        if std::thread::panicking() || std::env::var_os("SHOAL_TEST_LOGS").is_some() {
            eprintln!("---- agent {} log ----\n{}", self.addr, self.log());
        }
    }
}

/// What `ctr images pull` did.
#[derive(Debug)]
pub struct PullOutput {
    /// Whether it exited 0.
    pub success: bool,
    /// Its combined output.
    pub output: String,
}

/// The containerd namespace the testbed pulls into.
pub(crate) const NAMESPACE: &str = "shoal-test";

/// A `containerd` daemon with its own root, state and socket, and a hosts dir for `ctr --hosts-dir`.
#[derive(Debug)]
pub struct Containerd {
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts containerd and waits for its socket.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("shoal-ctrd").tempdir()?;
        let d = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{ttrpc}"
[debug]
  level = "warn"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            ttrpc = d.join("t.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        std::fs::create_dir_all(d.join("hosts"))?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let child = tokio::process::Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting containerd (Debian package containerd)")?;
        let me = Self { child: Some(child), dir };
        let sock = me.socket();
        wait_for("containerd's socket", Duration::from_secs(30), async || {
            tokio::net::UnixStream::connect(&sock).await.is_ok()
        })
        .await?;
        Ok(me)
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The hosts dir passed to `ctr --hosts-dir`.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Writes `hosts.toml` for `registry` (`127.0.0.1:PORT`): the mirror first when given (`http://ADDR`), the
    /// registry itself as the fallback `server`.
    pub fn configure_host(&self, registry: &str, mirror: Option<&str>) -> Result<()> {
        let dir = self.hosts_dir().join(registry);
        std::fs::create_dir_all(&dir)?;
        let mut toml = format!("server = \"http://{registry}\"\n");
        if let Some(m) = mirror {
            toml.push_str(&format!("\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"));
        }
        std::fs::write(dir.join("hosts.toml"), toml)?;
        Ok(())
    }

    /// Runs `ctr` against this containerd in the agent's namespace.
    pub async fn ctr(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = tokio::process::Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running ctr")?;
        Ok(out)
    }

    /// `ctr images pull` through the hosts dir, with the native snapshotter. `extra` adds flags such as
    /// `--all-platforms`.
    pub async fn pull(&self, reference: &str, user: Option<&str>, extra: &[&str]) -> Result<PullOutput> {
        let hosts = self.hosts_dir();
        let hosts = hosts.to_str().context("hosts dir path is UTF-8")?;
        let mut args = vec!["images", "pull", "--hosts-dir", hosts, "--snapshotter", "native"];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.extend(extra);
        args.push(reference);
        let out = self.ctr(&args).await?;
        let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok(PullOutput { success: out.status.success(), output })
    }

    /// Whether containerd's content store holds `digest` with exactly those bytes.
    pub async fn has_verified(&self, digest: &str) -> Result<bool> {
        let out = self.ctr(&["content", "get", digest]).await?;
        if !out.status.success() {
            return Ok(false);
        }
        let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&out.stdout)));
        Ok(got == digest)
    }

    /// Deletes an image and runs containerd's garbage collector before returning (`ctr images rm --sync`).
    pub async fn remove_image(&self, name: &str) -> Result<()> {
        let out = self.ctr(&["images", "rm", "--sync", name]).await?;
        if !out.status.success() {
            bail!("ctr images rm {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The output of `ctr leases ls`.
    pub async fn leases(&self) -> Result<String> {
        let out = self.ctr(&["leases", "ls"]).await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Directory of containerd's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        // Snapshots of the native snapshotter are plain directories; unmount nothing, just let TempDir remove them.
    }
}
