//! The Shoal testbed: real processes for end-to-end tests and benchmarks, each killed when its handle drops.
//!
//! - [`Registry`]: Debian's `docker-registry` (CNCF distribution) as the upstream, optionally with htpasswd.
//! - [`Proxy`]: an HTTP hop in front of the registry that counts requests and can lie (corrupt blob bodies) or
//!   crawl (throttle), so tests can say "upstream sent each blob once" and make upstream misbehave.
//! - [`image`]: images built as OCI layouts (random tar layers) and pushed with `skopeo`.
//! - [`Containerd`]: a `containerd` daemon with its own root, and `ctr` pulls through a hosts dir.
//! - [`Agent`]: a `shoal agent` process with its own data dir and ports.
//! - [`netns`]: nodes in network namespaces on a bridge, with bandwidth caps (the burst benchmark's topology).
//! - [`client`]: an image pull over HTTP as containerd does it, for bursts of many nodes.
//! - [`kube`]: a fake Kubernetes API server serving Nodes (the one mock: no cluster runs here).

pub mod client;
pub mod cluster;
pub mod image;
pub mod kube;
pub mod netns;
mod process;
mod proxy;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use process::{Agent, AgentBuilder, Containerd, PullOutput};
pub use proxy::{Fault, NsProxy, Proxy, ProxyStats};

/// A free TCP port on 127.0.0.1 (bound and released; the tiny race is acceptable in tests).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `f` returns true, polling every 20 ms, for at most `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A `docker-registry` process serving plain HTTP on loopback.
#[derive(Debug)]
pub struct Registry {
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    /// `user:password` when started with htpasswd auth.
    pub credentials: Option<(String, String)>,
    /// The network namespace it runs in.
    netns: Option<String>,
}

impl Registry {
    /// Starts a public registry.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a registry that requires Basic auth with these credentials.
    pub async fn start_private(user: &str, password: &str) -> Result<Self> {
        Self::start_with(Some((user.to_owned(), password.to_owned()))).await
    }

    async fn start_with(credentials: Option<(String, String)>) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        Self::launch(credentials, addr, None, None).await
    }

    /// Starts a public registry inside `ns`, on its address and `port`; with `proxy_of`, as a pull-through cache
    /// of that registry URL (`docker-registry`'s `proxy:` mode).
    pub async fn start_in(ns: &netns::Netns, port: u16, proxy_of: Option<&str>) -> Result<Self> {
        let addr = SocketAddr::new(ns.ip().into(), port);
        Self::launch(None, addr, Some(ns.name().to_owned()), proxy_of.map(str::to_owned)).await
    }

    async fn launch(
        credentials: Option<(String, String)>,
        addr: SocketAddr,
        netns: Option<String>,
        proxy_of: Option<String>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("shoal-registry").tempdir()?;
        let mut auth = String::new();
        if let Some((user, password)) = &credentials {
            let htpasswd = dir.path().join("htpasswd");
            let out = std::process::Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("running htpasswd (apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::fs::write(&htpasswd, out.stdout)?;
            auth = format!("auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n", htpasswd.display());
        }
        let proxy = proxy_of.map(|url| format!("proxy:\n  remoteurl: {url}\n")).unwrap_or_default();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}{proxy}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut reg = Self { child: None, dir, addr, credentials, netns };
        reg.spawn().await?;
        Ok(reg)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("registry.log"))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => tokio::process::Command::new("docker-registry"),
        };
        let child = cmd
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        self.child = Some(child);
        let url = format!("http://{}/v2/", self.addr);
        let client = reqwest::Client::new();
        wait_for("docker-registry to answer", Duration::from_secs(20), async || client.get(&url).send().await.is_ok())
            .await
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the registry (SIGKILL); [`Registry::restart`] brings it back with the same content and port.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts the registry again after [`Registry::stop`].
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.spawn().await
    }

    /// The `--dest-creds` argument for skopeo, if private.
    pub fn creds_arg(&self) -> Option<String> {
        self.credentials.as_ref().map(|(u, p)| format!("{u}:{p}"))
    }

    /// Directory of the registry's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name (state is the 1st).
    let ticks: f64 =
        fields.get(11).context("no utime")?.parse::<f64>()? + fields.get(12).context("no stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Peak resident memory of a process so far (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    let kib: u64 = line.split_whitespace().nth(1).context("malformed VmHWM")?.parse()?;
    Ok(kib << 10)
}

/// The path of the `shoal` binary: `SHOAL_BIN`, or `shoal` beside the running test's target directory.
pub fn shoal_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("shoal");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no shoal binary near {}: run `cargo build -p shoal-agent` first or set SHOAL_BIN", exe.display())
}

/// sha256 of bytes as an OCI digest string.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}
