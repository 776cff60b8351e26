//! The `shoal` CLI's admin commands: a client of the admin socket that prints tables (or JSON with `-o json`).

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::json;
use shoal_proto::admin as pb;
use shoal_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// An admin command.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// The node at a glance: members, store use, downloads, upstream registries.
    Status,
    /// The members this node knows.
    Peers,
    /// The blobs this node holds.
    Blobs {
        /// Only the manifests and blobs of the images resolved by tag in this repository (`repository` or
        /// `registry/repository`).
        #[arg(long)]
        repo: Option<String>,
    },
    /// The images this node resolved by tag, and how much of each it holds.
    Images,
    /// Warm this node with an image through the normal path (store, containerd, members, upstream).
    Pull {
        /// `[registry/]repository[:tag][@digest]`.
        image: String,
        /// `os/architecture[/variant]` of an index (default: this node's).
        #[arg(long, conflicts_with = "all_platforms")]
        platform: Option<String>,
        /// Every platform of an index.
        #[arg(long)]
        all_platforms: bool,
    },
    /// Warm the cluster through the homes: in each zone the image's homes fetch every blob once. Exits 1 if any
    /// zone failed.
    Preheat {
        /// `[registry/]repository[:tag][@digest]`.
        image: String,
        /// `all`, or zones separated by commas.
        #[arg(long, default_value = "all")]
        zones: String,
        /// `os/architecture[/variant]` of an index (default: this node's).
        #[arg(long, conflicts_with = "all_platforms")]
        platform: Option<String>,
        /// Every platform of an index.
        #[arg(long)]
        all_platforms: bool,
        /// How long to wait for the zones.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Pin it too once every zone holds it (the homes keep it).
        #[arg(long)]
        pin: bool,
        /// Holders of every blob per zone: its home, then members chosen by a hash of the image (at most 16, and
        /// at most the zone's members).
        #[arg(long, default_value_t = 1)]
        replicas: u32,
    },
    /// Where each blob of an image (or one digest) came from on this node's last download of it: members (which,
    /// how many bytes), upstream, retries, failures.
    Explain {
        /// An image reference or a digest.
        target: String,
        /// `os/architecture[/variant]` of an index (default: this node's).
        #[arg(long)]
        platform: Option<String>,
    },
    /// Pin an image: this node pulls it, and no node's GC evicts its blobs (told to every member). Refused when
    /// the pinned bytes would not fit the store's budget.
    Pin {
        /// `[registry/]repository[:tag][@digest]`.
        image: String,
        /// `os/architecture[/variant]` of an index (default: this node's).
        #[arg(long, conflicts_with = "all_platforms")]
        platform: Option<String>,
        /// Every platform of an index.
        #[arg(long)]
        all_platforms: bool,
    },
    /// Remove a pin (on every member).
    Unpin {
        /// The image as pinned.
        image: String,
    },
    /// The pins this node knows.
    Pins,
    /// Drop a blob from this node's store.
    Evict {
        /// `sha256:…`.
        digest: String,
    },
    /// Check every stored blob against its digest. Exits 1 on any problem.
    Verify,
}

async fn connect(socket: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let path: PathBuf = socket.to_owned();
    let channel =
        tonic::transport::Endpoint::from_static("http://shoal.admin")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .with_context(|| {
                format!("connecting to the agent's admin socket {} (is the agent running? --socket)", socket.display())
            })?;
    Ok(AdminClient::new(channel))
}

/// The agent's answer as an error that reads well after `shoal: `.
fn refused(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unavailable => "unavailable",
        _ => "failed",
    };
    anyhow::anyhow!("{code}: {}", s.message())
}

/// A pull's progress line: a bar over the whole image, then the blob being read.
fn progress_bar(p: &pb::BlobProgress) -> String {
    const WIDTH: usize = 30;
    let short = p.digest.get(..19).unwrap_or(&p.digest);
    if p.image_bytes == 0 {
        return format!("reading manifests… {short}");
    }
    let frac = (p.image_read as f64 / p.image_bytes as f64).clamp(0.0, 1.0);
    let filled = (frac * WIDTH as f64).round() as usize;
    let bar: String = "=".repeat(filled) + &" ".repeat(WIDTH - filled);
    format!("[{bar}] {:>3.0}%  {} / {}  {short}", frac * 100.0, bytes(p.image_read), bytes(p.image_bytes))
}

/// `n` bytes for people.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(head.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn pin_json(p: &pb::Pin) -> serde_json::Value {
    json!({
        "image": p.image, "digest": p.digest, "blobs": p.blobs, "bytes": p.bytes, "pinned": p.pinned,
        "stamp": p.stamp, "held": p.held,
    })
}

fn print_pin(r: &pb::PinReply, json: bool, what: &str) {
    let Some(p) = &r.pin else { return };
    if json {
        println!("{:#}", json!({"pin": pin_json(p), "members_told": r.members_told, "members_alive": r.members_alive}));
    } else {
        println!(
            "{what} {} ({}): {} blobs, {}; told {} of {} alive members",
            p.image,
            p.digest,
            p.blobs,
            bytes(p.bytes),
            r.members_told,
            r.members_alive
        );
    }
}

/// Runs `cmd` against the agent at `socket`.
pub async fn run(cmd: Command, socket: &Path, format: Format) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let json = format == Format::Json;
    match cmd {
        Command::Status => {
            let s = c.status(pb::StatusRequest {}).await.map_err(refused)?.into_inner();
            if json {
                let v = json!({
                    "node": s.node, "peer_id": s.peer_id, "zone": s.zone, "version": s.version,
                    "uptime_seconds": s.uptime_seconds, "mirror": s.mirror,
                    "members": {"alive": s.members_alive, "suspect": s.members_suspect, "dead": s.members_dead},
                    "homed_digests": s.homed_digests,
                    "store": {"bytes": s.store_bytes, "blobs": s.store_blobs, "budget_bytes": s.store_budget_bytes, "pinned_bytes": s.store_pinned_bytes},
                    "downloads": s.downloads.iter().map(|d| json!({"digest": d.digest, "written": d.written, "size": d.size})).collect::<Vec<_>>(),
                    "registries": s.registries.iter().map(|r| json!({"host": r.host, "down": r.down})).collect::<Vec<_>>(),
                });
                println!("{v:#}");
                return Ok(());
            }
            let up = s.uptime_seconds;
            let mut out = String::new();
            let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<11} {v}\n"));
            kv("node", if s.node.is_empty() { "-".into() } else { s.node.clone() });
            kv("peer id", if s.peer_id.is_empty() { "- (no mesh)".into() } else { s.peer_id.clone() });
            kv("zone", s.zone.clone());
            kv("version", s.version.clone());
            kv("uptime", format!("{}h {}m {}s", up / 3600, up / 60 % 60, up % 60));
            kv("mirror", s.mirror.clone());
            kv("members", format!("{} alive, {} suspect, {} dead", s.members_alive, s.members_suspect, s.members_dead));
            kv("home of", format!("{} digests", s.homed_digests));
            kv(
                "store",
                format!(
                    "{} in {} blobs, {} of it pinned (budget {})",
                    bytes(s.store_bytes),
                    s.store_blobs,
                    bytes(s.store_pinned_bytes),
                    bytes(s.store_budget_bytes)
                ),
            );
            for r in &s.registries {
                kv("registry", format!("{} {}", r.host, if r.down { "DOWN (avoided)" } else { "up" }));
            }
            if s.downloads.is_empty() {
                kv("downloads", "none".into());
            }
            for d in &s.downloads {
                let size = if d.size == 0 { "?".into() } else { bytes(d.size) };
                kv("download", format!("{} {} / {size}", d.digest, bytes(d.written)));
            }
            print!("{out}");
        }
        Command::Peers => {
            let p = c.peers(pb::PeersRequest {}).await.map_err(refused)?.into_inner();
            if json {
                let v: Vec<_> = p.peers.iter().map(|p| json!({
                    "peer_id": p.peer_id, "node": p.node, "zone": p.zone, "address": p.address, "state": p.state,
                    "quarantined": p.quarantined, "last_heard_ms": p.last_heard_ms, "bytes_sent": p.bytes_sent,
                    "bytes_received": p.bytes_received,
                })).collect();
                println!("{:#}", json!(v));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = p
                .peers
                .iter()
                .map(|p| {
                    let node = if p.node.is_empty() { "-".to_owned() } else { p.node.clone() };
                    let q = if p.quarantined { "yes" } else { "no" };
                    let heard = p.last_heard_ms.map_or("never".to_owned(), |ms| format!("{:.1}s ago", ms as f64 / 1e3));
                    vec![
                        p.peer_id.clone(),
                        node,
                        p.zone.clone(),
                        p.address.clone(),
                        p.state.clone(),
                        heard,
                        bytes(p.bytes_sent),
                        bytes(p.bytes_received),
                        q.into(),
                    ]
                })
                .collect();
            let head = ["PEER ID", "NODE", "ZONE", "ADDRESS", "STATE", "LAST HEARD", "SENT", "RECEIVED", "QUARANTINED"];
            print!("{}", table(&head, &rows));
        }
        Command::Blobs { repo } => {
            let b = c.blobs(pb::BlobsRequest { repo: repo.unwrap_or_default() }).await.map_err(refused)?.into_inner();
            if json {
                let v: Vec<_> = b
                    .blobs
                    .iter()
                    .map(|b| {
                        json!({
                            "digest": b.digest, "size": b.size, "last_access": b.last_access, "public": b.public,
                            "registry": b.registry,
                        })
                    })
                    .collect();
                println!("{:#}", json!(v));
                return Ok(());
            }
            let now = crate::store::now_secs();
            let rows: Vec<Vec<String>> = b
                .blobs
                .iter()
                .map(|b| {
                    let ago = now.saturating_sub(b.last_access);
                    let public = if b.public { "yes" } else { "no" };
                    let reg = if b.registry.is_empty() { "-".to_owned() } else { b.registry.clone() };
                    vec![b.digest.clone(), bytes(b.size), format!("{ago}s ago"), public.into(), reg]
                })
                .collect();
            print!("{}", table(&["DIGEST", "SIZE", "LAST READ", "PUBLIC", "REGISTRY"], &rows));
        }
        Command::Images => {
            let r = c.images(pb::ImagesRequest {}).await.map_err(refused)?.into_inner();
            if json {
                let v: Vec<_> = r
                    .images
                    .iter()
                    .map(|i| {
                        json!({
                            "image": i.image, "digest": i.digest, "resolved_at": i.resolved_at, "public": i.public,
                            "blobs": i.blobs, "held": i.held, "bytes_held": i.bytes_held, "last_access": i.last_access,
                        })
                    })
                    .collect();
                println!("{:#}", json!(v));
                return Ok(());
            }
            let now = crate::store::now_secs();
            let rows: Vec<Vec<String>> = r
                .images
                .iter()
                .map(|i| {
                    let read = if i.last_access == 0 {
                        "-".into()
                    } else {
                        format!("{}s ago", now.saturating_sub(i.last_access))
                    };
                    vec![
                        i.image.clone(),
                        i.digest.clone(),
                        format!("{}/{}", i.held, i.blobs),
                        bytes(i.bytes_held),
                        read,
                    ]
                })
                .collect();
            print!("{}", table(&["IMAGE", "DIGEST", "BLOBS HELD", "SIZE HELD", "LAST READ"], &rows));
        }
        Command::Pull { image, platform, all_platforms } => {
            let req = pb::PullRequest { image: image.clone(), platform: platform.unwrap_or_default(), all_platforms };
            let mut events = c.pull(req).await.map_err(refused)?.into_inner();
            let tty = std::io::stderr().is_terminal() && !json;
            let mut summary = None;
            while let Some(ev) = events.message().await.map_err(refused)? {
                match ev.event {
                    Some(pb::pull_event::Event::Progress(p)) if tty => {
                        eprint!("\r\x1b[2K{}", progress_bar(&p));
                        let _ = std::io::stderr().flush();
                    }
                    Some(pb::pull_event::Event::Done(s)) => summary = Some(s),
                    _ => {}
                }
            }
            if tty {
                eprint!("\r\x1b[2K");
            }
            let s = summary.context("the agent ended the pull without a summary")?;
            if json {
                let v = json!({
                    "image": image, "digest": s.digest, "blobs": s.blobs, "bytes": s.bytes, "seconds": s.seconds,
                    "from": {"store": s.from_store, "containerd": s.from_containerd, "peers": s.from_peers, "upstream": s.from_upstream},
                });
                println!("{v:#}");
                return Ok(());
            }
            println!("pulled {image} ({}): {} blobs, {} in {:.2} s", s.digest, s.blobs, bytes(s.bytes), s.seconds);
            for (k, v) in [
                ("store", s.from_store),
                ("containerd", s.from_containerd),
                ("peers", s.from_peers),
                ("upstream", s.from_upstream),
            ] {
                println!("  {k:<11} {}", bytes(v));
            }
        }
        Command::Preheat { image, zones, platform, all_platforms, timeout, pin, replicas } => {
            let zones = if zones == "all" {
                Vec::new()
            } else {
                zones.split(',').map(|z| z.trim().to_owned()).filter(|z| !z.is_empty()).collect()
            };
            let req = pb::PreheatRequest {
                image: image.clone(),
                platform: platform.unwrap_or_default(),
                all_platforms,
                zones,
                timeout_seconds: u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX),
                pin,
                replicas,
            };
            let mut events = c.preheat(req).await.map_err(refused)?.into_inner();
            let mut summary = None;
            while let Some(ev) = events.message().await.map_err(refused)? {
                match ev.event {
                    Some(pb::preheat_event::Event::Progress(z)) if !json => {
                        eprintln!("zone {}: {} of {} blobs held", z.zone, z.ready, z.blobs);
                    }
                    Some(pb::preheat_event::Event::Done(s)) => summary = Some(s),
                    _ => {}
                }
            }
            let s = summary.context("the agent ended the preheat without a summary")?;
            let failed = s.zones.iter().filter(|z| !z.failure.is_empty()).count();
            if json {
                let zones: Vec<_> = s
                    .zones
                    .iter()
                    .map(|z| json!({"zone": z.zone, "ready": z.ready, "blobs": z.blobs, "failure": z.failure}))
                    .collect();
                println!(
                    "{:#}",
                    json!({"image": image, "digest": s.digest, "blobs": s.blobs, "bytes": s.bytes, "seconds": s.seconds, "zones": zones, "pinned": s.pinned, "members_told": s.members_told})
                );
            } else {
                println!(
                    "preheated {image} ({}): {} blobs, {} in {:.1} s",
                    s.digest,
                    s.blobs,
                    bytes(s.bytes),
                    s.seconds
                );
                let rows: Vec<Vec<String>> = s
                    .zones
                    .iter()
                    .map(|z| {
                        let result =
                            if z.failure.is_empty() { "ready".to_owned() } else { format!("FAILED: {}", z.failure) };
                        vec![z.zone.clone(), format!("{}/{}", z.ready, z.blobs), result]
                    })
                    .collect();
                print!("{}", table(&["ZONE", "HELD", "RESULT"], &rows));
                if s.pinned {
                    println!("pinned: told {} members", s.members_told);
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} zones failed", s.zones.len());
            }
        }
        Command::Explain { target, platform } => {
            let req = pb::ExplainRequest { target: target.clone(), platform: platform.unwrap_or_default() };
            let r = c.explain(req).await.map_err(refused)?.into_inner();
            if json {
                let blobs: Vec<_> = r
                    .blobs
                    .iter()
                    .map(|b| {
                        let peers: Vec<_> =
                            b.from_peers.iter().map(|p| json!({"peer_id": p.peer_id, "bytes": p.bytes})).collect();
                        json!({
                            "digest": b.digest, "manifest": b.manifest, "stored": b.stored,
                            "in_containerd": b.in_containerd, "recorded": b.recorded, "when": b.when,
                            "seconds": b.seconds, "failure": b.failure, "from_upstream": b.from_upstream,
                            "from_peers": peers, "restarts": b.restarts, "source_failures": b.source_failures,
                        })
                    })
                    .collect();
                println!("{:#}", json!({"target": target, "digest": r.digest, "blobs": blobs}));
                return Ok(());
            }
            println!("{target} ({})", r.digest);
            let rows: Vec<Vec<String>> = r
                .blobs
                .iter()
                .map(|b| {
                    let held = match (b.stored, b.in_containerd) {
                        (true, true) => "store, containerd",
                        (true, false) => "store",
                        (false, true) => "containerd",
                        (false, false) => "-",
                    };
                    let from = if !b.recorded {
                        "no download since the agent started".to_owned()
                    } else {
                        let mut parts: Vec<String> = b
                            .from_peers
                            .iter()
                            .map(|p| {
                                format!(
                                    "{} {}",
                                    p.peer_id.get(p.peer_id.len().saturating_sub(8)..).unwrap_or(&p.peer_id),
                                    bytes(p.bytes)
                                )
                            })
                            .collect();
                        if b.from_upstream > 0 || parts.is_empty() {
                            parts.push(format!("upstream {}", bytes(b.from_upstream)));
                        }
                        let mut s = parts.join(", ");
                        s.push_str(&format!(" in {:.2} s", b.seconds));
                        if b.restarts > 0 || b.source_failures > 0 {
                            s.push_str(&format!(" ({} restarts, {} failed sources)", b.restarts, b.source_failures));
                        }
                        if !b.failure.is_empty() {
                            s.push_str(&format!(" FAILED: {}", b.failure));
                        }
                        s
                    };
                    let kind = if b.manifest { "manifest" } else { "blob" };
                    vec![b.digest.clone(), kind.into(), held.into(), from]
                })
                .collect();
            print!("{}", table(&["DIGEST", "KIND", "HELD", "LAST DOWNLOAD (peer: …last 8 of its id)"], &rows));
        }
        Command::Pin { image, platform, all_platforms } => {
            let req = pb::PinRequest { image, platform: platform.unwrap_or_default(), all_platforms };
            let r = c.pin(req).await.map_err(refused)?.into_inner();
            print_pin(&r, json, "pinned");
        }
        Command::Unpin { image } => {
            let r = c.unpin(pb::PinRequest { image, ..Default::default() }).await.map_err(refused)?.into_inner();
            print_pin(&r, json, "unpinned");
        }
        Command::Pins => {
            let r = c.pins(pb::PinsRequest {}).await.map_err(refused)?.into_inner();
            if json {
                let pins: Vec<_> = r.pins.iter().map(pin_json).collect();
                println!("{:#}", json!({"pins": pins, "pinned_held": r.pinned_held, "budget": r.budget}));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = r
                .pins
                .iter()
                .map(|p| vec![p.image.clone(), p.digest.clone(), p.blobs.to_string(), bytes(p.bytes), bytes(p.held)])
                .collect();
            print!("{}", table(&["IMAGE", "DIGEST", "BLOBS", "SIZE", "HELD HERE"], &rows));
            println!("pinned and held here: {} of a {} budget", bytes(r.pinned_held), bytes(r.budget));
        }
        Command::Evict { digest } => {
            let r = c.evict(pb::EvictRequest { digest: digest.clone() }).await.map_err(refused)?.into_inner();
            if json {
                println!("{:#}", json!({"digest": digest, "freed": r.freed}));
            } else {
                println!("evicted {digest}: {} freed", bytes(r.freed));
            }
        }
        Command::Verify => {
            let v = c.verify(pb::VerifyRequest {}).await.map_err(refused)?.into_inner();
            if json {
                println!("{:#}", json!({"blobs": v.blobs, "bytes": v.bytes, "problems": v.problems}));
            } else {
                for p in &v.problems {
                    println!("problem: {p}");
                }
                println!("{} blobs, {}, {} problems", v.blobs, bytes(v.bytes), v.problems.len());
            }
            if !v.problems.is_empty() {
                anyhow::bail!("the store has {} problems", v.problems.len());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_bar_covers_the_whole_image() {
        let p = |read, total| pb::BlobProgress {
            digest: "sha256:0123456789abcdef".into(),
            read: 0,
            size: 0,
            image_read: read,
            image_bytes: total,
        };
        assert!(progress_bar(&p(0, 0)).starts_with("reading manifests"));
        let half = progress_bar(&p(50, 100));
        assert!(half.starts_with(&format!("[{}{}]  50%", "=".repeat(15), " ".repeat(15))), "{half}");
        assert!(progress_bar(&p(100, 100)).contains("100%"));
        assert!(progress_bar(&p(150, 100)).contains("100%"), "never past the end");
    }
}
