//! The Kubernetes manifests, loaded into the API's own types (`k8s-openapi`) and checked for wiring: what the
//! DaemonSet mounts, exposes and probes is what the agent's config reads and listens on; the Secret is mounted
//! where the config reads it; RBAC grants exactly what the agent calls. Checked on the plain manifests
//! (`deploy/kustomize`, rendered from the chart) and on the Helm chart rendered with its defaults (generated
//! Secret, uninstall hook), with the `helm` that `scripts/install-deps.sh` installs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

mod chart;
use chart::{all, deploy_dir, helm_template, objects, one};

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(-1)
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

/// The directory a container mounts `volume` at, if it does.
fn mount_of(c: &Container, volume: &str) -> Option<String> {
    c.volume_mounts.as_ref()?.iter().find(|m| m.name == volume).map(|m| m.mount_path.clone())
}

/// The pod's volume that container `c` mounts at `path`.
fn volume_at<'a>(pod: &'a PodSpec, c: &Container, path: &str) -> Option<&'a Volume> {
    pod.volumes.as_ref()?.iter().find(|v| mount_of(c, &v.name).as_deref() == Some(path))
}

fn host_path_volume(spec: &PodSpec, path: &str) -> Option<(String, Option<String>)> {
    spec.volumes.as_ref()?.iter().find_map(|v| {
        let hp = v.host_path.as_ref()?;
        (hp.path == path).then(|| (v.name.clone(), hp.type_.clone()))
    })
}

fn rule(groups: &[&str], resources: &[&str], names: Option<&[&str]>, verbs: &[&str]) -> PolicyRule {
    let s = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    PolicyRule {
        api_groups: s(groups),
        resources: s(resources),
        resource_names: names.and_then(s),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Checks the agent's DaemonSet, its config, Service, ServiceAccount and RBAC against each other. Returns the
/// name of the Secret the DaemonSet mounts and the containerd hosts dir the config writes to.
fn check_agent(objs: &[serde_json::Value]) -> Result<(String, String)> {
    let ds: DaemonSet = one(objs, "DaemonSet", "shoal")?;
    let spec = ds.spec.as_ref().context("spec")?;
    let pod = spec.template.spec.as_ref().context("pod spec")?;
    let c = container(pod, "shoal");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"), "hostNetwork pods need it for bootstrap");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        pod.tolerations
            .as_ref()
            .context("tolerations")?
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );

    // The config the container reads.
    let args = c.args.as_ref().context("args")?;
    let config_path = args.windows(2).find(|w| w[0] == "--config").map(|w| w[1].clone()).context("--config")?;
    let config_dir = Path::new(&config_path).parent().context("config dir")?.to_str().context("utf-8")?.to_owned();
    let file_name = Path::new(&config_path).file_name().context("file")?.to_str().context("utf-8")?.to_owned();
    let config_volume = volume_at(pod, c, &config_dir).context("the config file's directory is mounted")?;
    let cm_name = config_volume.config_map.as_ref().context("the config comes from a ConfigMap")?.name.clone();
    let cm: ConfigMap = one(objs, "ConfigMap", &cm_name)?;
    let text = cm.data.as_ref().and_then(|d| d.get(&file_name)).context("the ConfigMap holds the file")?.clone();
    shoal_agent::config::RawConfig::from_toml(&text).map_err(anyhow::Error::msg).context("the agent parses it")?;
    let cfg: toml::Table = text.parse()?;
    let s = |k: &str| cfg.get(k).and_then(toml::Value::as_str).map(str::to_owned).unwrap_or_else(|| panic!("{k}"));

    // Downward API.
    let env: BTreeMap<String, String> = c
        .env
        .as_ref()
        .context("env")?
        .iter()
        .filter_map(|e| Some((e.name.clone(), e.value_from.as_ref()?.field_ref.as_ref()?.field_path.clone())))
        .collect();
    assert_eq!(env.get("SHOAL_NODE_NAME").map(String::as_str), Some("spec.nodeName"));
    assert_eq!(env.get("SHOAL_ADVERTISE_IP").map(String::as_str), Some("status.hostIP"));
    // Metrics and probes on the node's address only, from the env (after the variable it expands).
    let vars: Vec<(String, Option<String>)> =
        c.env.as_ref().context("env")?.iter().map(|e| (e.name.clone(), e.value.clone())).collect();
    let at = |name: &str| vars.iter().position(|(n, _)| n == name);
    let metrics_listen = vars
        .iter()
        .find(|(n, _)| n == "SHOAL_METRICS_LISTEN")
        .and_then(|(_, v)| v.clone())
        .context("SHOAL_METRICS_LISTEN set in the env")?;
    assert!(metrics_listen.starts_with("$(SHOAL_ADVERTISE_IP):"), "metrics on the node address: {metrics_listen}");
    assert!(at("SHOAL_ADVERTISE_IP") < at("SHOAL_METRICS_LISTEN"), "Kubernetes expands only variables defined before");
    assert!(cfg.get("metrics_listen").is_none(), "the env, not the file, says where metrics listen");
    let metrics_port = port_of(&metrics_listen);

    // Ports and probes.
    let ports: BTreeMap<String, (i32, String)> = c
        .ports
        .as_ref()
        .context("ports")?
        .iter()
        .map(|p| (p.name.clone().unwrap_or_default(), (p.container_port, p.protocol.clone().unwrap_or_default())))
        .collect();
    assert_eq!(ports["metrics"], (metrics_port, "TCP".into()));
    assert_eq!(ports["gossip"], (port_of(&s("gossip_listen")), "TCP".into()));
    assert_eq!(ports["transfer"], (port_of(&s("transfer_listen")), "UDP".into()));
    assert!(s("listen").starts_with("127.0.0.1:"), "the mirror stays on loopback");
    // The admin socket sits in a node directory (the CLI on the node reaches it), not in the container's own.
    let admin = s("admin_socket");
    let admin_dir = Path::new(&admin).parent().context("admin socket dir")?.to_str().context("utf-8")?.to_owned();
    let admin_volume = volume_at(pod, c, &admin_dir).context("the admin socket's directory is mounted")?;
    assert!(admin_volume.host_path.is_some(), "the admin socket's directory is a hostPath: {admin_volume:?}");
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).context("an HTTP probe")?;
        assert_eq!(get.path.as_deref(), Some(path));
        let port = match &get.port {
            IntOrString::String(name) => ports[name].0,
            IntOrString::Int(n) => *n,
        };
        assert_eq!(port, metrics_port, "{path} is probed where the agent serves it");
    }

    // The Secret is mounted where the config reads it.
    let secret_file = Path::new(&s("cluster_secret_file")).to_owned();
    let secret_dir = secret_file.parent().context("dir")?.to_str().context("utf-8")?.to_owned();
    let secret_volume = volume_at(pod, c, &secret_dir).context("the secret's directory is mounted")?;
    let secret_name =
        secret_volume.secret.as_ref().and_then(|s| s.secret_name.clone()).context("mounted from a Secret")?;
    assert_eq!(secret_file.file_name().and_then(|f| f.to_str()), Some("cluster-secret"), "the Secret's key");

    // Host paths: data, containerd's socket, hosts dir and config, each at the path the config names.
    for (key, host_type) in [
        ("data_dir", Some("DirectoryOrCreate")),
        ("containerd_socket", Some("Socket")),
        ("containerd_hosts_dir", Some("DirectoryOrCreate")),
        ("containerd_config", Some("FileOrCreate")),
    ] {
        let path = s(key);
        let volume = volume_at(pod, c, &path).unwrap_or_else(|| panic!("nothing mounted at {key} = {path}"));
        let hp = volume.host_path.as_ref().unwrap_or_else(|| panic!("{key} is not a hostPath"));
        assert_eq!(hp.type_.as_deref(), host_type, "{key}");
        if key != "data_dir" {
            assert_eq!(hp.path, path, "{key}: the node's path, at the same place in the container");
        }
    }

    // Shutdown: the kubelet waits longer than the agent drains.
    let grace = humantime::parse_duration(&s("shutdown_grace"))?;
    assert!(pod.termination_grace_period_seconds.context("grace")? as u64 > grace.as_secs());

    // Least privilege in the container.
    let sc = c.security_context.as_ref().context("securityContext")?;
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.privileged, None);
    assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
    assert!(sc.capabilities.as_ref().and_then(|c| c.add.as_ref()).is_none());
    let res = c.resources.as_ref().context("resources")?;
    for part in [&res.requests, &res.limits] {
        let part = part.as_ref().context("requests and limits")?;
        assert!(part.contains_key("cpu") && part.contains_key("memory"), "{part:?}");
    }

    // Bootstrap: the headless Service, with not-ready addresses, selecting these pods, on the gossip port.
    let services: Vec<Service> = all(objs, "Service")?;
    let [svc] = services.as_slice() else { bail!("one Service expected") };
    let svc_spec = svc.spec.as_ref().context("spec")?;
    assert_eq!(svc_spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc_spec.publish_not_ready_addresses, Some(true));
    let pod_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).context("pod labels")?;
    for (k, v) in svc_spec.selector.as_ref().context("selector")? {
        assert_eq!(pod_labels.get(k), Some(v), "the Service selects the agents");
    }
    let svc_ports = svc_spec.ports.as_ref().context("ports")?;
    assert!(svc_ports.iter().any(|p| p.port == port_of(&s("gossip_listen")) && p.protocol.as_deref() == Some("TCP")));
    let ns = svc.metadata.namespace.clone().context("namespace")?;
    let bootstrap = cfg["bootstrap"].as_array().context("bootstrap")?;
    let want =
        format!("{}.{ns}.svc:{}", svc.metadata.name.as_deref().unwrap_or_default(), port_of(&s("gossip_listen")));
    assert_eq!(bootstrap.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>(), vec![want.as_str()]);

    // RBAC: the agent's service account may read nodes (its own for the zone label, all of them for the members'
    // identities) and, when it follows ImageCache objects, read those and write their status; nothing else.
    let sa_name = pod.service_account_name.clone().context("a service account")?;
    let _: ServiceAccount = one(objs, "ServiceAccount", &sa_name)?;
    let bindings: Vec<ClusterRoleBinding> = all(objs, "ClusterRoleBinding")?;
    let [binding] = bindings.as_slice() else { bail!("one ClusterRoleBinding expected") };
    let subjects = binding.subjects.as_ref().context("subjects")?;
    assert!(
        subjects.iter().all(|s| s.kind == "ServiceAccount" && s.name == sa_name && s.namespace.as_deref() == Some(&ns))
    );
    let role: ClusterRole = one(objs, "ClusterRole", &binding.role_ref.name)?;
    let mut rules = vec![rule(&[""], &["nodes"], None, &["get", "list", "watch"])];
    if cfg.get("image_caches").and_then(toml::Value::as_bool) == Some(true) {
        use shoal_agent::admin::imagecache::{GROUP, KIND, PLURAL, VERSION};
        rules.push(rule(&[GROUP], &[PLURAL], None, &["get", "list", "watch"]));
        rules.push(rule(&[GROUP], &[&format!("{PLURAL}/status")], None, &["update", "patch"]));
        // The CRD the chart installs is the one the agent follows, with a status subresource it can write.
        let crd: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(deploy_dir().join("helm/shoal/crds/imagecache.yaml"))?)?;
        assert_eq!(crd["metadata"]["name"], format!("{PLURAL}.{GROUP}"));
        assert_eq!((&crd["spec"]["group"], &crd["spec"]["names"]["kind"]), (&GROUP.into(), &KIND.into()));
        assert_eq!(crd["spec"]["names"]["plural"], PLURAL);
        let v = &crd["spec"]["versions"][0];
        assert_eq!((&v["name"], &v["served"]), (&VERSION.into(), &true.into()));
        assert!(v["subresources"]["status"].is_object(), "the agent writes status through the subresource");
    }
    if cfg.get("prefetch_rollouts").and_then(toml::Value::as_bool) == Some(true) {
        rules.push(rule(&["apps"], &["deployments", "statefulsets", "daemonsets"], None, &["get", "list", "watch"]));
    }
    assert_eq!(role.rules, Some(rules));
    assert!(
        all::<Role>(objs, "Role")?.iter().all(|r| r
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("helm.sh/hook"))),
        "no other role is bound to the agent"
    );
    Ok((secret_name, s("containerd_hosts_dir")))
}

#[test]
fn plain_manifests_are_wired_to_the_agents_config() -> Result<()> {
    let dir = deploy_dir().join("kustomize");
    let objs = objects(&std::fs::read_to_string(dir.join("shoal.yaml"))?)?;
    assert_eq!(all::<serde_json::Value>(&objs, "Namespace")?.len(), 1);
    let (secret, _) = check_agent(&objs)?;
    // kubectl has no crds/ directory: the plain manifests carry the CRD.
    let crds: Vec<serde_json::Value> = all(&objs, "CustomResourceDefinition")?;
    assert_eq!(
        crds.iter().filter_map(|c| c["metadata"]["name"].as_str()).collect::<Vec<_>>(),
        vec!["imagecaches.shoal.dev"]
    );
    // The Secret comes from kustomize's generator, from a file made at install time: none in the manifests.
    assert!(all::<Secret>(&objs, "Secret")?.is_empty(), "no secret value in the repository");
    let kustomization: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
    let generators = kustomization["secretGenerator"].as_array().context("secretGenerator")?;
    assert!(
        generators.iter().any(|g| g["name"] == secret.as_str()),
        "the generator makes the Secret the DaemonSet mounts"
    );
    assert_eq!(kustomization["generatorOptions"]["disableNameSuffixHash"], true, "so the name stays the one mounted");
    assert!(
        !dir.join("cluster-secret").exists()
            || std::fs::read_to_string(dir.join(".gitignore"))?.contains("cluster-secret")
    );
    Ok(())
}

#[test]
fn optional_features_bring_their_rbac_and_only_then() -> Result<()> {
    // Prefetch on rollouts on, image caches off: the workloads' read access comes, the ImageCache rules go.
    let objs =
        objects(&helm_template(&["--set", "prefetchRollouts.enabled=true", "--set", "imageCaches.enabled=false"])?)?;
    check_agent(&objs)?;
    let role: ClusterRole = all(&objs, "ClusterRole")?.into_iter().next().context("a ClusterRole")?;
    let rules = role.rules.context("rules")?;
    assert!(rules.iter().any(|r| r.api_groups == Some(vec!["apps".into()])), "{rules:?}");
    assert!(!rules.iter().any(|r| r.api_groups == Some(vec!["shoal.dev".into()])), "{rules:?}");
    Ok(())
}

#[test]
fn the_helm_chart_generates_its_secret_and_restores_containerd_on_uninstall() -> Result<()> {
    let rendered = helm_template(&[])?;
    let objs = objects(&rendered)?;
    let (secret_name, hosts_dir) = check_agent(&objs)?;
    let secret: Secret = one(&objs, "Secret", &secret_name)?;
    let value = secret.data.as_ref().and_then(|d| d.get("cluster-secret")).context("key cluster-secret")?;
    assert!(value.0.len() >= 16, "a cluster secret needs at least 16 bytes");
    let again: Secret = one(&objects(&helm_template(&[])?)?, "Secret", &secret_name)?;
    assert_ne!(secret.data, again.data, "generated per install, not a fixed value");

    // The uninstall hook: a DaemonSet restoring the hosts dir the agent writes, a Job waiting for it, and the
    // waiter's Role granting exactly `get` on that DaemonSet.
    let hook: DaemonSet = one(&objs, "DaemonSet", "shoal-restore")?;
    let hook_pod = hook.spec.as_ref().and_then(|s| s.template.spec.clone()).context("pod")?;
    assert_eq!(
        hook.metadata.annotations.as_ref().and_then(|a| a.get("helm.sh/hook")).map(String::as_str),
        Some("post-delete")
    );
    for c in hook_pod.init_containers.iter().flatten().chain(&hook_pod.containers) {
        let args = c.args.clone().context("args")?;
        assert_eq!(args[0], "restore-hosts");
        assert!(args.windows(2).any(|w| w[0] == "--hosts-dir" && w[1] == hosts_dir), "{args:?}");
        assert_eq!(mount_of(c, "containerd-hosts").as_deref(), Some(hosts_dir.as_str()));
    }
    assert_eq!(host_path_volume(&hook_pod, &hosts_dir).map(|(n, _)| n).as_deref(), Some("containerd-hosts"));
    let job: Job = one(&objs, "Job", "shoal-restore-wait")?;
    let job_pod = job.spec.as_ref().and_then(|s| s.template.spec.clone()).context("pod")?;
    let args = job_pod.containers[0].args.clone().context("args")?;
    assert_eq!(args[0], "wait-daemonset");
    assert!(args.windows(2).any(|w| w[0] == "--name" && w[1] == "shoal-restore"));
    let job_sa = job_pod.service_account_name.context("sa")?;
    let binding: RoleBinding = one(&objs, "RoleBinding", "shoal-restore")?;
    assert!(binding.subjects.iter().flatten().all(|s| s.name == job_sa));
    let role: Role = one(&objs, "Role", &binding.role_ref.name)?;
    assert_eq!(role.rules, Some(vec![rule(&["apps"], &["daemonsets"], Some(&["shoal-restore"]), &["get"])]));
    Ok(())
}

#[tokio::test]
async fn every_metric_the_dashboard_charts_is_exported_by_the_agent() -> Result<()> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy_dir().join("grafana/shoal-dashboard.json"))?)?;
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("shoal_") {
                    names.insert(word.trim_end_matches("_total").trim_end_matches("_bucket").to_owned());
                }
            }
        }
    }
    assert!(names.len() >= 15, "{names:?}");
    let agent = shoal_testbed::Agent::builder().start().await?;
    let exported = agent.metrics().await?;
    let types: std::collections::BTreeSet<&str> =
        exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let missing: Vec<_> = names.iter().filter(|n| !types.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard charts metrics the agent does not export: {missing:?}");
    Ok(())
}

#[tokio::test]
async fn the_agent_takes_its_zone_from_its_nodes_label() -> Result<()> {
    // A fake API server serving one Node; the agent finds it through a kubeconfig, as outside a cluster.
    let api = shoal_testbed::kube::FakeApi::start(vec![shoal_testbed::kube::FakeNode::new(
        "worker-7",
        std::net::Ipv4Addr::new(127, 0, 0, 81),
        Some("eu-west-1b"),
    )])
    .await?;
    let cl = shoal_testbed::cluster::Cluster::start().await?;
    let kubeconfig = api.kubeconfig.clone();
    let zoned = cl
        .agent(81, &[])
        .setting("node_name", "\"worker-7\"")
        .env("KUBECONFIG", kubeconfig.to_str().context("utf-8")?)
        .start()
        .await?;
    assert!(zoned.log().contains("zone=eu-west-1b"), "{}", zoned.log());
    let listed = shoal_testbed::wait_for("the Nodes listed", std::time::Duration::from_secs(10), async || {
        zoned.log().contains("Nodes listed objects=1")
    })
    .await;
    assert!(listed.is_ok(), "members are checked against the Nodes: {}", zoned.log());
    // Bound to its Node (the default with a node name), the label is the zone even over the config key: other
    // members would refuse any other.
    let bound = cl
        .agent(82, &[])
        .setting("node_name", "\"worker-7\"")
        .setting("zone", "\"rack-3\"")
        .env("KUBECONFIG", kubeconfig.to_str().context("utf-8")?)
        .start()
        .await?;
    assert!(bound.log().contains("zone=eu-west-1b") && bound.log().contains("differs from the Node's zone label"));
    // Not bound, the config key overrides the label.
    let pinned = cl
        .agent(83, &[])
        .setting("node_name", "\"worker-7\"")
        .setting("member_binding", "\"open\"")
        .setting("zone", "\"rack-3\"")
        .env("KUBECONFIG", kubeconfig.to_str().context("utf-8")?)
        .start()
        .await?;
    assert!(pinned.log().contains("zone=rack-3"), "{}", pinned.log());
    Ok(())
}
