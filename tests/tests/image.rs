//! The agent's container image, run the way the DaemonSet runs it: `scripts/image.sh` packs the agent binary (the
//! one under test: the debug build in CI) into an OCI layout, twice, to the same digest; skopeo pushes it to the
//! testbed's registry; a real containerd pulls it and runs it with runc, with exactly what the rendered chart
//! specifies — the entrypoint from the image, the container's args and env, host network, the volumes at their
//! mount paths (hostPaths and the ConfigMap and Secret as files), a read-only root filesystem, every capability
//! dropped, no new privileges, the default seccomp profile (and the running process is checked for each in
//! `/proc`); it becomes ready on the readiness probe's path and port; a second
//! containerd pulls an image through it (with the hosts files the agent wrote); SIGTERM stops it within the
//! grace period. The Kubernetes API is the testbed's fake (what the pod's service account would reach).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Probe, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use shoal_testbed::image::{Artifact, Compression, Format, Image, push};
use shoal_testbed::kube::{FakeApi, FakeNode};
use shoal_testbed::{Containerd, Registry, shoal_bin, wait_for};

mod chart;
use chart::{helm_template, objects, one};

const NODE: &str = "image-e2e-node";
const CONTAINER: &str = "shoal-image-e2e";

/// Every Linux capability: `drop: ["ALL"]` as ctr takes it (one `--cap-drop` each).
const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Runs `scripts/image.sh` on the agent binary under test; the digest it prints.
fn build_image(out: &Path, tag: &str) -> Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh");
    let run = std::process::Command::new("bash")
        .arg(script)
        .arg("--binary")
        .arg(shoal_bin()?)
        .arg("--out")
        .arg(out)
        .args(["--tag", tag])
        // Fixed, so two builds compare without depending on git.
        .env("SOURCE_DATE_EPOCH", "1764460800")
        .output()?;
    ensure!(run.status.success(), "scripts/image.sh: {}", String::from_utf8_lossy(&run.stderr));
    Ok(String::from_utf8(run.stdout)?.trim().to_owned())
}

/// The image config's entrypoint, read from the layout (index → manifest → config).
fn entrypoint(layout: &Path) -> Result<Vec<String>> {
    let blob = |digest: &str| -> Result<serde_json::Value> {
        let hex = digest.strip_prefix("sha256:").context("a sha256 digest")?;
        Ok(serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex))?)?)
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifest = blob(index["manifests"][0]["digest"].as_str().context("a manifest")?)?;
    let config = blob(manifest["config"]["digest"].as_str().context("a config")?)?;
    let entry = config["config"]["Entrypoint"].as_array().context("an entrypoint")?;
    entry.iter().map(|v| v.as_str().map(str::to_owned).context("a string")).collect()
}

/// Kills and removes the container whatever happens to the test (runc's container outlives containerd otherwise).
struct RemoveContainer {
    socket: PathBuf,
}

impl Drop for RemoveContainer {
    fn drop(&mut self) {
        let ctr = |args: &[&str]| {
            let _ = std::process::Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "shoal-test"])
                .args(args)
                .output();
        };
        ctr(&["task", "kill", "--signal", "SIGKILL", CONTAINER]);
        std::thread::sleep(Duration::from_millis(300));
        ctr(&["task", "delete", "--force", CONTAINER]);
        ctr(&["container", "delete", CONTAINER]);
    }
}

/// `$(VAR)` references in `value` expanded from `env` (Kubernetes' dependent environment variables).
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut v = value.to_owned();
    for (k, val) in env {
        v = v.replace(&format!("$({k})"), val);
    }
    v
}

/// The container's environment as the kubelet would set it on `NODE` at 127.0.0.1.
fn environment(c: &Container) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for e in c.env.as_deref().unwrap_or_default() {
        let value = match (&e.value, e.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(v), _) => expand(v, &env),
            (None, Some(f)) => match f.field_path.as_str() {
                "spec.nodeName" => NODE.to_owned(),
                "status.hostIP" | "status.podIP" => "127.0.0.1".to_owned(),
                other => bail!("env {}: a field this test does not know: {other}", e.name),
            },
            (None, None) => bail!("env {}: neither a value nor a field", e.name),
        };
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

#[tokio::test]
async fn the_image_runs_under_containerd_as_the_daemonset_specifies() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("shoal-image").tempdir()?;
    let d = dir.path();
    let started = Instant::now();
    let digest = build_image(&d.join("layout"), "e2e")?;
    let packed = started.elapsed();
    let again = build_image(&d.join("layout-again"), "e2e")?;
    assert_eq!(digest, again, "the same binary and SOURCE_DATE_EPOCH give the same image");
    let layer_bytes: u64 = std::fs::read_dir(d.join("layout/blobs/sha256"))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);

    // Push it; the node's containerd pulls it.
    let registry = Registry::start().await?;
    let host = registry.host();
    let copy = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:e2e", d.join("layout").display()))
        .arg(format!("docker://{host}/shoal:e2e"))
        .output()?;
    ensure!(copy.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&copy.stderr));
    let node = Containerd::start().await?;
    node.configure_host(&host, None)?;
    let image_ref = format!("{host}/shoal:e2e");
    let pulled = node.pull(&image_ref, None, &[]).await?;
    ensure!(pulled.success, "containerd could not pull the image: {}", pulled.output);

    // The chart, rendered for this image and a plain-HTTP registry.
    let values = d.join("values.yaml");
    std::fs::write(&values, format!("registries:\n  \"{host}\":\n    plain_http: true\n"))?;
    let rendered = helm_template(&[
        "--set",
        &format!("image.repository={host}/shoal"),
        "--set",
        "image.tag=e2e",
        "-f",
        values.to_str().context("UTF-8 path")?,
    ])?;
    let objs = objects(&rendered)?;
    let ds: DaemonSet = one(&objs, "DaemonSet", "shoal")?;
    let pod = ds.spec.as_ref().and_then(|s| s.template.spec.clone()).context("a pod spec")?;
    let c = pod.containers.iter().find(|c| c.name == "shoal").context("the agent's container")?.clone();
    assert_eq!(c.image.as_deref(), Some(image_ref.as_str()));
    assert_eq!(pod.host_network, Some(true));
    let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30).try_into()?);

    // The volumes, as files on this "node".
    let fake_api = FakeApi::start(vec![FakeNode::new(NODE, [127, 0, 0, 1], Some("zone-a"))]).await?;
    let mut mounts: Vec<String> = Vec::new();
    let hosts_dir = d.join("certs.d");
    for m in c.volume_mounts.as_deref().unwrap_or_default() {
        let v = pod.volumes.as_deref().unwrap_or_default().iter().find(|v| v.name == m.name).context("a volume")?;
        let src = d.join("volumes").join(&v.name);
        if let Some(cm) = &v.config_map {
            let cm: ConfigMap = one(&objs, "ConfigMap", &cm.name)?;
            std::fs::create_dir_all(&src)?;
            for (k, text) in cm.data.unwrap_or_default() {
                std::fs::write(src.join(k), text)?;
            }
        } else if let Some(s) = &v.secret {
            let s: Secret = one(&objs, "Secret", s.secret_name.as_deref().context("a secret name")?)?;
            std::fs::create_dir_all(&src)?;
            for (k, v) in s.data.unwrap_or_default() {
                std::fs::write(src.join(k), v.0)?;
            }
            for (k, v) in s.string_data.unwrap_or_default() {
                std::fs::write(src.join(k), v)?;
            }
        } else if let Some(hp) = &v.host_path {
            match (hp.path.as_str(), hp.type_.as_deref()) {
                (p, Some("Socket")) if p.ends_with(".sock") => {
                    // containerd's socket: the node's containerd.
                    std::fs::create_dir_all(src.parent().context("a parent")?)?;
                    std::os::unix::fs::symlink(node.socket(), &src)?;
                }
                (p, Some("FileOrCreate")) if p.ends_with("config.toml") => {
                    std::fs::create_dir_all(src.parent().context("a parent")?)?;
                    let hosts = c
                        .volume_mounts
                        .as_deref()
                        .unwrap_or_default()
                        .iter()
                        .find(|m| m.mount_path.ends_with("certs.d"))
                        .map(|m| m.mount_path.clone())
                        .context("the hosts dir is mounted")?;
                    std::fs::write(
                        &src,
                        format!(
                            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{hosts}\"\n"
                        ),
                    )?;
                }
                (p, _) if p.ends_with("certs.d") => {
                    std::fs::create_dir_all(&hosts_dir)?;
                    std::os::unix::fs::symlink(&hosts_dir, &src)?;
                }
                _ => std::fs::create_dir_all(&src)?,
            }
        } else {
            bail!("volume {}: a kind this test does not know", v.name);
        }
        let src = std::fs::canonicalize(&src)?;
        let ro = if m.read_only == Some(true) { "ro" } else { "rw" };
        mounts.push(format!("type=bind,src={},dst={},options=rbind:{ro}", src.display(), m.mount_path));
    }
    // What the pod's service account gives it in a cluster: the API server (the testbed's fake).
    let kubeconfig = "/run/shoal-e2e/kubeconfig";
    mounts.push(format!("type=bind,src={},dst={kubeconfig},options=rbind:ro", fake_api.kubeconfig_env()?));

    // The container as the kubelet would start it.
    let layout = d.join("layout");
    let mut args: Vec<String> =
        vec!["run", "--detach", "--snapshotter", "native"].into_iter().map(Into::into).collect();
    args.push(format!("--log-uri=file://{}", d.join("agent.log").display()));
    if pod.host_network == Some(true) {
        args.push("--net-host".into());
    }
    let sc = c.security_context.clone().context("a security context")?;
    if sc.read_only_root_filesystem == Some(true) {
        args.push("--read-only".into());
    }
    if sc.seccomp_profile.as_ref().is_some_and(|p| p.type_ == "RuntimeDefault") {
        args.push("--seccomp".into());
    }
    // ctr sets no-new-privileges unless told otherwise, as the kubelet does for `allowPrivilegeEscalation: false`.
    if sc.allow_privilege_escalation != Some(false) {
        args.push("--allow-new-privs".into());
    }
    let drops = sc.capabilities.as_ref().and_then(|c| c.drop.clone()).unwrap_or_default();
    assert_eq!(drops, vec!["ALL".to_owned()], "the chart drops every capability");
    ensure!(sc.capabilities.as_ref().and_then(|c| c.add.as_ref()).is_none(), "the chart adds none");
    for cap in CAPABILITIES {
        args.push(format!("--cap-drop=CAP_{cap}"));
    }
    let env = environment(&c)?;
    for (k, v) in &env {
        args.push(format!("--env={k}={v}"));
    }
    args.push(format!("--env=KUBECONFIG={kubeconfig}"));
    for m in &mounts {
        args.push(format!("--mount={m}"));
    }
    args.push(image_ref.clone());
    args.push(CONTAINER.into());
    let mut process = entrypoint(&layout)?;
    ensure!(c.command.is_none(), "the chart keeps the image's entrypoint");
    process.extend(c.args.clone().unwrap_or_default().iter().map(|a| expand(a, &env)));
    args.extend(process);
    let _cleanup = RemoveContainer { socket: node.socket() };
    let launched = Instant::now();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = node.ctr(&argv).await?;
    ensure!(run.status.success(), "ctr run: {}", String::from_utf8_lossy(&run.stderr));

    // Ready on the readiness probe's path and port.
    let probe_url = |probe: Option<&Probe>, what: &str| -> Result<(i32, String)> {
        let get = probe.and_then(|p| p.http_get.clone()).with_context(|| format!("an HTTP {what} probe"))?;
        let port = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(name) => c
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .with_context(|| format!("the {what} probe's named port"))?,
        };
        Ok((port, format!("http://127.0.0.1:{port}{}", get.path.as_deref().unwrap_or("/"))))
    };
    let (port, ready_url) = probe_url(c.readiness_probe.as_ref(), "readiness")?;
    let (_, live_url) = probe_url(c.liveness_probe.as_ref(), "liveness")?;
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build()?;
    let log = || std::fs::read_to_string(d.join("agent.log")).unwrap_or_default();
    let ready = wait_for("the containerized agent to be ready", Duration::from_secs(60), async || {
        http.get(&ready_url).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    if let Err(e) = ready {
        bail!("{e}\nthe agent's log:\n{}", log());
    }
    let up = launched.elapsed();
    let live = http.get(&live_url).send().await?;
    ensure!(live.status().is_success(), "the liveness probe's {live_url}: {}", live.status());

    // The running process has what the security context asks: no capabilities, no new privileges, seccomp on.
    let tasks = node.ctr(&["task", "ls"]).await?;
    let tasks = String::from_utf8_lossy(&tasks.stdout).into_owned();
    let pid = tasks
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(CONTAINER)).then(|| f.next()).flatten()
        })
        .with_context(|| format!("the agent's task in `ctr task ls`: {tasks}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default();
    assert_eq!(field("CapEff:"), "0000000000000000", "no effective capabilities");
    assert_eq!(field("CapBnd:"), "0000000000000000", "no bounding capabilities");
    assert_eq!(field("NoNewPrivs:"), "1", "allowPrivilegeEscalation: false");
    assert_eq!(field("Seccomp:"), "2", "the runtime's default seccomp filter");

    // A second containerd pulls through it, with the hosts files the agent wrote.
    let app = Artifact::Image(Image::random(&[700_000, 200_000], 91, "amd64", Compression::Gzip)?);
    push(&app, &host, "e2e/app", "v1", None, Format::Oci)?;
    let written = hosts_dir.join(&host).join("hosts.toml");
    wait_for("the agent to write its hosts file", Duration::from_secs(20), async || written.exists()).await?;
    let client = Containerd::start().await?;
    let out = tokio::process::Command::new("ctr")
        .arg("--address")
        .arg(client.socket())
        .args(["--namespace", "k8s.io", "images", "pull", "--snapshotter", "native", "--hosts-dir"])
        .arg(&hosts_dir)
        .arg(format!("{host}/e2e/app:v1"))
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "pull through the agent: {}{}\nthe agent's log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let metrics = http.get(&metrics_url).send().await?.text().await?;
    let upstream: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("shoal_upstream_bytes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(upstream >= 900_000.0, "the pull went through the agent (upstream bytes {upstream})");

    // SIGTERM: stopped within the grace period.
    let term = Instant::now();
    let kill = node.ctr(&["task", "kill", "--signal", "SIGTERM", CONTAINER]).await?;
    ensure!(kill.status.success(), "ctr task kill: {}", String::from_utf8_lossy(&kill.stderr));
    wait_for("the agent to stop on SIGTERM", grace, async || {
        node.ctr(&["task", "ls"]).await.is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(CONTAINER) && l.split_whitespace().last() == Some("STOPPED"))
        })
    })
    .await
    .with_context(|| format!("the agent's log:\n{}", log()))?;
    let stopped = term.elapsed();
    eprintln!(
        "image {digest}: packed in {packed:.1?}, layer {:.1} MiB compressed; ready {up:.1?} after `ctr run`; \
         stopped {stopped:.1?} after SIGTERM (grace {grace:?})",
        layer_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
