//! Nodes in network namespaces on one bridge, with bandwidth caps: the topology of a cluster on one machine.
//!
//! Each [`Netns`] is a namespace with one veth pair: its end inside (`eth0`, an address on the bridge's subnet,
//! `10.77.<subnet>.0/24`, loopback
//! up) and its end on the bridge in the root namespace. A cap is a `tbf` qdisc on both ends, so it limits what the
//! namespace sends and what it receives (`netem` is not available here: no latency or loss emulation). The root
//! namespace has an address on the bridge too, so the harness reaches every namespace's listeners; code that must
//! run *inside* a namespace (a client on a node's loopback) runs on a thread that entered it ([`Netns::spawn`]).
//! Everything is deleted on drop, and leftovers of a crashed run (same name prefix) on creation.

use std::future::Future;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The first two octets of every bridge's subnet (`10.77.<subnet>.0/24`).
const NET: [u8; 2] = [10, 77];

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A cap on a link, in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl Rate {
    /// `n` Mbit/s.
    pub const fn mbit(n: u64) -> Self {
        Self(n * 1_000_000)
    }

    /// Bytes per second.
    pub fn bytes_per_sec(self) -> f64 {
        self.0 as f64 / 8.0
    }

    fn tbf_args(self) -> [String; 6] {
        // The bucket holds ~4 ms at the rate (at least 256 KiB: GSO hands the qdisc packets of up to 64 KiB).
        let burst = (self.0 / 8 / 250).max(256 << 10);
        ["rate".into(), format!("{}bit", self.0), "burst".into(), burst.to_string(), "latency".into(), "50ms".into()]
    }
}

/// The bridge all namespaces of a testbed hang off.
#[derive(Debug)]
pub struct Bridge {
    name: String,
    prefix: String,
    subnet: u8,
}

impl Bridge {
    /// Creates the bridge `<prefix>br` on `10.77.0.0/24` (deleting a leftover one and leftover namespaces of the
    /// prefix first).
    pub fn create(prefix: &str) -> Result<Self> {
        Self::create_on(prefix, 0)
    }

    /// Creates the bridge `<prefix>br` on `10.77.<subnet>.0/24`: bridges that exist at the same time need distinct
    /// subnets.
    pub fn create_on(prefix: &str, subnet: u8) -> Result<Self> {
        if prefix.len() > 8 {
            bail!("prefix {prefix:?}: at most 8 characters (interface names are short)");
        }
        cleanup(prefix);
        let name = format!("{prefix}br");
        run(&["ip", "link", "add", &name, "type", "bridge"])?;
        let bridge = Self { name, prefix: prefix.to_owned(), subnet };
        run(&["ip", "addr", "add", &format!("{}/24", bridge.host_ip()), "dev", &bridge.name])?;
        run(&["ip", "link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    /// The root namespace's address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], self.subnet, 254)
    }

    /// A namespace `<prefix><n>` at `10.77.<subnet>.<n>` on this bridge, its link capped at `cap` both ways.
    pub fn netns(&self, n: u8, cap: Option<Rate>) -> Result<Netns> {
        if n == 0 || n >= 254 {
            bail!("namespace number {n}: 1..=253");
        }
        let name = format!("{}{n}", self.prefix);
        let ip = Ipv4Addr::new(NET[0], NET[1], self.subnet, n);
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name: name.clone(), ip, host_veth: format!("{name}h") };
        let inner = format!("{name}i");
        run(&["ip", "link", "add", &ns.host_veth, "type", "veth", "peer", "name", &inner])?;
        run(&["ip", "link", "set", &inner, "netns", &name])?;
        run(&["ip", "link", "set", &ns.host_veth, "master", &self.name])?;
        run(&["ip", "link", "set", &ns.host_veth, "up"])?;
        let exec = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &name];
            all.extend_from_slice(args);
            run(&all)
        };
        exec(&["ip", "link", "set", "lo", "up"])?;
        exec(&["ip", "link", "set", &inner, "name", "eth0"])?;
        exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        exec(&["ip", "link", "set", "eth0", "up"])?;
        if let Some(rate) = cap {
            ns.set_cap(rate)?;
        }
        Ok(ns)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.name]);
    }
}

/// Deletes namespaces and links left by an earlier run with this prefix.
fn cleanup(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.strip_prefix(prefix).is_some_and(|n| n.parse::<u8>().is_ok()) {
                let _ = run(&["ip", "netns", "del", name]);
                let _ = run(&["ip", "link", "del", &format!("{name}h")]);
            }
        }
    }
    let _ = run(&["ip", "link", "del", &format!("{prefix}br")]);
}

/// A network namespace with its address on the bridge.
#[derive(Debug)]
pub struct Netns {
    name: String,
    ip: Ipv4Addr,
    host_veth: String,
}

impl Netns {
    /// Its name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Bytes this namespace sent on its link so far (counted on the bridge side, where they arrive).
    pub fn sent_bytes(&self) -> Result<u64> {
        let p = format!("/sys/class/net/{}/statistics/rx_bytes", self.host_veth);
        Ok(std::fs::read_to_string(&p).with_context(|| p.clone())?.trim().parse()?)
    }

    /// Caps this namespace's link at `rate` both ways (replacing any cap): what it sends (its eth0's egress) and
    /// what it receives (the bridge port's egress).
    pub fn set_cap(&self, rate: Rate) -> Result<()> {
        let tbf = rate.tbf_args();
        let tbf: Vec<&str> = tbf.iter().map(String::as_str).collect();
        let mut out = vec!["ip", "netns", "exec", &self.name, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf"];
        out.extend(&tbf);
        run(&out)?;
        let mut inn = vec!["tc", "qdisc", "replace", "dev", &self.host_veth, "root", "tbf"];
        inn.extend(&tbf);
        run(&inn)
    }

    /// Drops every packet between this namespace and `others` (both ways), until [`Netns::heal`].
    pub fn cut_off(&self, others: &[Ipv4Addr]) -> Result<()> {
        for ip in others {
            let ip = ip.to_string();
            self.iptables(&["-A", "INPUT", "-s", &ip, "-j", "DROP"])?;
            self.iptables(&["-A", "OUTPUT", "-d", &ip, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Drops every packet arriving for TCP `port` in this namespace (a service that stopped answering: connects
    /// time out rather than being refused), until [`Netns::heal`].
    pub fn blackhole_port(&self, port: u16) -> Result<()> {
        self.iptables(&["-A", "INPUT", "-p", "tcp", "--dport", &port.to_string(), "-j", "DROP"])
    }

    /// Removes every rule [`Netns::cut_off`] and [`Netns::blackhole_port`] added.
    pub fn heal(&self) -> Result<()> {
        self.iptables(&["-F", "INPUT"])?;
        self.iptables(&["-F", "OUTPUT"])
    }

    fn iptables(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["ip", "netns", "exec", &self.name, "iptables", "-w"];
        all.extend_from_slice(args);
        run(&all)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered the namespace, on its own single-threaded runtime: sockets it opens live
    /// in the namespace (a node's loopback, its own address).
    pub fn spawn<F, Fut, T>(&self, f: F) -> tokio::task::JoinHandle<Result<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let file = std::fs::File::open(&path).with_context(|| path.clone())?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(f())
            })();
            let _ = tx.send(r);
        });
        tokio::spawn(async move { rx.await.context("namespace thread ended without an answer")? })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_veth]);
    }
}
