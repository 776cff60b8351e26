//! The `shoal` command.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_agent::config::RawConfig;

#[derive(Debug, Parser)]
#[command(name = "shoal", version, about = "A node-local, peer-to-peer registry mirror for containerd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The agent's admin socket (the admin commands).
    #[arg(long, global = true, env = "SHOAL_ADMIN_SOCKET", default_value = "./shoal-data/admin.sock")]
    socket: PathBuf,
    /// Output of the admin commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value = "table")]
    output: shoal_agent::admin::cli::Format,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Admin(shoal_agent::admin::cli::Command),
    /// Run the agent: the registry mirror containerd pulls through.
    Agent {
        /// TOML config file; flags and SHOAL_* env vars override its keys.
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<RawConfig>,
    },
    /// Put back the containerd hosts files the agent replaced (on uninstall).
    RestoreHosts {
        /// containerd's hosts dir (the agent's `containerd_hosts_dir`).
        #[arg(long, env = "SHOAL_CONTAINERD_HOSTS_DIR")]
        hosts_dir: PathBuf,
        /// After restoring, stay up until SIGTERM (the uninstall hook's DaemonSet: a running pod has restored).
        #[arg(long)]
        hold: bool,
    },
    /// Check a stopped agent's store: every indexed blob's file exists, has its size and hashes to its name, and
    /// every file is indexed. Exits 1 on any problem.
    CheckStore {
        /// The agent's data dir.
        #[arg(long, env = "SHOAL_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Wait until every pod of a DaemonSet is ready (the uninstall hook waits for the restore on every node).
    WaitDaemonset {
        /// Its namespace.
        #[arg(long, env = "SHOAL_NAMESPACE")]
        namespace: String,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Longest wait, e.g. `5m`.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// glibc's allocator keeps an arena per thread that allocates, up to 8 per core, and rarely returns their freed
/// memory: the blocking threads that read and write blobs each leave megabytes behind. Two arenas are plenty for
/// an agent whose work is I/O (measured in the 8-node burst: peak RSS 70 → 51 MiB, no slower).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    // SAFETY: called first thing in main, before any other thread exists; mallopt only sets a tunable.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain; no backtrace for an operator's mistake.
            eprintln!("shoal: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (config, settings) = match cli.command {
        Command::Agent { config, settings } => (config, settings),
        Command::Admin(cmd) => {
            return runtime()?.block_on(shoal_agent::admin::cli::run(cmd, &cli.socket, cli.output));
        }
        Command::RestoreHosts { hosts_dir, hold } => {
            restore_hosts(&hosts_dir)?;
            if hold {
                runtime()?.block_on(shutdown_signal());
            }
            return Ok(());
        }
        Command::CheckStore { data_dir } => {
            let c = shoal_agent::store::Store::check(&data_dir)
                .with_context(|| format!("checking the store under {}", data_dir.display()))?;
            for p in &c.problems {
                println!("problem: {p}");
            }
            println!(
                "{} blobs, {} bytes, {} partial files, {} problems",
                c.blobs,
                c.bytes,
                c.partials,
                c.problems.len()
            );
            if !c.problems.is_empty() {
                anyhow::bail!("the store under {} is inconsistent", data_dir.display());
            }
            return Ok(());
        }
        Command::WaitDaemonset { namespace, name, timeout } => {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            return runtime()?.block_on(async {
                let client = shoal_agent::kubernetes::client().await?;
                let every = std::time::Duration::from_secs(2);
                shoal_agent::kubernetes::wait_daemonset_ready(client, &namespace, &name, every, timeout).await?;
                println!("daemonset {namespace}/{name}: every pod is ready");
                Ok(())
            });
        }
    };
    let file = match &config {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    let cfg = (*settings).over(file).validate()?;
    shoal_agent::init_tracing(cfg.log_format);
    runtime()?.block_on(shoal_agent::agent::run(cfg, shutdown_signal()))?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")
}

fn restore_hosts(dir: &std::path::Path) -> anyhow::Result<()> {
    use shoal_agent::containerd::hosts::{Restored, restore};
    let done = restore(dir).with_context(|| format!("restoring the hosts files under {}", dir.display()))?;
    for r in &done {
        match r {
            Restored::Original(p) => println!("restored {}", p.display()),
            Restored::Removed(p) => println!("removed {} (there was none before)", p.display()),
            Restored::LeftAlone(p) => println!("left {} alone (changed since shoal wrote it)", p.display()),
        }
    }
    if done.is_empty() {
        println!("nothing to restore under {}", dir.display());
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds on Unix");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
