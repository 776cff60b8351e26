//! containerd's `hosts.toml` files (`<hosts dir>/<registry>/hosts.toml`): the writer that puts this mirror first,
//! the restore that undoes it, and the pre-flight checks of containerd's own config.
//!
//! The written file has the mirror as its first host (`pull` and `resolve`, a short `dial_timeout`, so a stopped
//! agent costs a pull little), the registry itself as `server`, and after ours every host the operator had in the
//! file, in their order (containerd tries hosts in file order). The operator's file is kept beside it as
//! `hosts.toml.shoal-orig` (or an empty `hosts.toml.shoal-none` when there was none) the first time; writing again
//! starts from that backup, so restarts do not stack mirrors. [`restore`] puts the original back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// First line of every file this writer produces: how a file is recognised as ours.
const MARK: &str = "# Written by shoal";
const FILE: &str = "hosts.toml";
const BACKUP: &str = "hosts.toml.shoal-orig";
const NONE: &str = "hosts.toml.shoal-none";

/// Why a hosts file could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The operator's file is not valid TOML: it is left alone.
    #[error("{path} is not valid TOML ({reason}): left as it is")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The registry name would leave the hosts dir.
    #[error("`{0}` is not a registry host name")]
    BadRegistry(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HostsError + 'a {
    move |source| HostsError::Io { op, path: path.to_owned(), source }
}

/// One registry's entry.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// The directory name: the registry host as containerd names it (`docker.io`, `127.0.0.1:5000`) or
    /// `_default`.
    pub registry: String,
    /// The registry's own URL (`server`), if known; `_default` leaves it to containerd.
    pub server: Option<String>,
}

/// Writes `<dir>/<registry>/hosts.toml` with `mirror` (`http://127.0.0.1:30020`) first. Returns the file.
pub fn write(dir: &Path, entry: &HostEntry, mirror: &str, dial_timeout: Duration) -> Result<PathBuf, HostsError> {
    if entry.registry.is_empty()
        || entry.registry.contains('/')
        || entry.registry.starts_with('.')
        || entry.registry.contains(char::is_whitespace)
    {
        return Err(HostsError::BadRegistry(entry.registry.clone()));
    }
    let rdir = dir.join(&entry.registry);
    fs::create_dir_all(&rdir).map_err(io_err("create", &rdir))?;
    let (file, backup, none) = (rdir.join(FILE), rdir.join(BACKUP), rdir.join(NONE));
    let current = read_opt(&file)?;
    let original = match &current {
        Some(text) if is_ours(text) => read_opt(&backup)?,
        other => {
            // Not ours (first write, or the operator replaced our file): this is the original to keep.
            match other {
                Some(text) => {
                    parse(text, &file)?;
                    write_atomic(&backup, text)?;
                    remove_opt(&none)?;
                }
                None => {
                    write_atomic(&none, "")?;
                    remove_opt(&backup)?;
                }
            }
            other.clone()
        }
    };
    let original = match &original {
        Some(text) => parse(text, &backup)?,
        None => toml::Table::new(),
    };
    write_atomic(&file, &render(&original, entry, mirror, dial_timeout))?;
    Ok(file)
}

/// The file's text: ours first, then the operator's hosts and settings.
fn render(original: &toml::Table, entry: &HostEntry, mirror: &str, dial_timeout: Duration) -> String {
    let mut doc = toml::Table::new();
    // The operator's server wins: they know how this node reaches the registry.
    let server = original.get("server").cloned().or_else(|| entry.server.clone().map(toml::Value::String));
    if let Some(s) = server {
        doc.insert("server".into(), s);
    }
    for (k, v) in original {
        if k != "server" && k != "host" {
            doc.insert(k.clone(), v.clone());
        }
    }
    let mut hosts = toml::Table::new();
    let mut ours = toml::Table::new();
    ours.insert("capabilities".into(), toml::Value::Array(vec!["pull".into(), "resolve".into()]));
    ours.insert("dial_timeout".into(), humantime::format_duration(dial_timeout).to_string().into());
    hosts.insert(mirror.to_owned(), toml::Value::Table(ours));
    if let Some(toml::Value::Table(theirs)) = original.get("host") {
        for (k, v) in theirs {
            if k != mirror {
                hosts.insert(k.clone(), v.clone());
            }
        }
    }
    doc.insert("host".into(), toml::Value::Table(hosts));
    let body = toml::to_string(&doc).expect("a table of strings and tables always serialises");
    format!(
        "{MARK}: this node's mirror first, then the registry's own hosts. `shoal restore-hosts` puts back the\n\
         # original (kept beside this file as {BACKUP}, or {NONE} when there was none).\n{body}"
    )
}

/// What [`restore`] did for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The operator's file is back.
    Original(PathBuf),
    /// There was none: ours is removed.
    Removed(PathBuf),
    /// Someone replaced our file since: theirs is left, our backup dropped.
    LeftAlone(PathBuf),
}

/// Restores every registry's original file under `dir` (the files this writer replaced).
pub fn restore(dir: &Path) -> Result<Vec<Restored>, HostsError> {
    let mut done = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for rdir in dirs {
        let (file, backup, none) = (rdir.join(FILE), rdir.join(BACKUP), rdir.join(NONE));
        let (has_backup, has_none) = (backup.exists(), none.exists());
        if !has_backup && !has_none {
            continue;
        }
        let ours = read_opt(&file)?.is_none_or(|t| is_ours(&t));
        if !ours {
            remove_opt(&backup)?;
            remove_opt(&none)?;
            done.push(Restored::LeftAlone(file));
        } else if has_backup {
            fs::rename(&backup, &file).map_err(io_err("restore", &file))?;
            remove_opt(&none)?;
            done.push(Restored::Original(file));
        } else {
            remove_opt(&file)?;
            remove_opt(&none)?;
            // The directory was made for our file; an operator's other files keep it.
            let _ = fs::remove_dir(&rdir);
            done.push(Restored::Removed(file));
        }
    }
    Ok(done)
}

fn is_ours(text: &str) -> bool {
    text.starts_with(MARK)
}

fn parse(text: &str, path: &Path) -> Result<toml::Table, HostsError> {
    text.parse::<toml::Table>().map_err(|e| HostsError::Parse { path: path.to_owned(), reason: e.message().to_owned() })
}

fn read_opt(path: &Path) -> Result<Option<String>, HostsError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn remove_opt(path: &Path) -> Result<(), HostsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Writes through a temporary file and a rename: containerd reads these files on every pull and must never see
/// half of one.
fn write_atomic(path: &Path, text: &str) -> Result<(), HostsError> {
    let tmp = path.with_extension("shoal-tmp");
    fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))
}

/// Checks containerd's config file for settings that stop it from using the hosts files or leave it nothing to
/// share. Returns one warning per problem (the agent logs them; none is fatal).
pub fn preflight(config: &Path, hosts_dir: &Path) -> Vec<String> {
    let text = match fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            return vec![format!(
                "cannot read containerd's config {} ({e}): make sure its registry `config_path` is {}",
                config.display(),
                hosts_dir.display()
            )];
        }
    };
    let doc = match text.parse::<toml::Table>() {
        Ok(d) => d,
        Err(e) => return vec![format!("containerd's config {} is not valid TOML: {}", config.display(), e.message())],
    };
    check_config(&doc, hosts_dir)
}

fn get<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, init) = path.split_last()?;
    let mut cur = t;
    for k in init {
        cur = cur.get(*k)?.as_table()?;
    }
    cur.get(*last)
}

fn check_config(doc: &toml::Table, hosts_dir: &Path) -> Vec<String> {
    let mut w = Vec::new();
    let version = doc.get("version").and_then(toml::Value::as_integer).unwrap_or(1);
    // containerd 1.x (config version 2; version 1 nests plugins without the `io.containerd.grpc.v1.` prefix and
    // is not supported by the hosts dir at all) and 2.x (version 3) keep the CRI registry settings apart.
    let (registry, discard): (&[&str], &[&str]) = if version >= 3 {
        (
            &["plugins", "io.containerd.cri.v1.images", "registry"],
            &["plugins", "io.containerd.cri.v1.images", "discard_unpacked_layers"],
        )
    } else {
        (
            &["plugins", "io.containerd.grpc.v1.cri", "registry"],
            &["plugins", "io.containerd.grpc.v1.cri", "containerd", "discard_unpacked_layers"],
        )
    };
    if version < 2 {
        w.push(format!(
            "containerd's config is version {version}: hosts files need `version = 2` (containerd 1.x) or 3 (2.x)"
        ));
    }
    let reg = get(doc, registry).and_then(toml::Value::as_table);
    // The table to fix, as the operator writes it in config.toml.
    let table = format!("[plugins.\"{}\".registry]", registry[1]);
    match reg.and_then(|r| r.get("config_path")).and_then(toml::Value::as_str) {
        None | Some("") => w.push(format!(
            "containerd's registry `config_path` is not set: containerd ignores hosts files and never asks this \
             mirror; set it under {table}: config_path = \"{}\"",
            hosts_dir.display()
        )),
        Some(p) if !p.split(':').any(|p| Path::new(p) == hosts_dir) => w.push(format!(
            "containerd's registry `config_path` is {p}, but this agent writes hosts files to {}",
            hosts_dir.display()
        )),
        Some(_) => {}
    }
    for legacy in ["mirrors", "configs"] {
        if reg.and_then(|r| r.get(legacy)).and_then(toml::Value::as_table).is_some_and(|t| !t.is_empty()) {
            w.push(format!(
                "containerd's registry `{legacy}` is set: the deprecated settings conflict with `config_path` \
                 (containerd refuses both, or ignores the hosts files); move them into hosts files"
            ));
        }
    }
    if get(doc, discard).and_then(toml::Value::as_bool) == Some(true) {
        w.push(
            "containerd's `discard_unpacked_layers` is true: it deletes layers once unpacked, so this node has \
             nothing of containerd's to share with its peers"
                .to_owned(),
        );
    }
    if version >= 3 {
        let local_pull = get(doc, &["plugins", "io.containerd.cri.v1.images", "use_local_image_pull"])
            .and_then(toml::Value::as_bool)
            == Some(true);
        let transfer_path =
            get(doc, &["plugins", "io.containerd.transfer.v1.local", "config_path"]).and_then(toml::Value::as_str);
        let transfer = transfer_path.is_some_and(|p| !p.is_empty());
        // containerd 2.1/2.2's transfer service takes `config_path` as one directory: a list (EKS's default,
        // `/etc/containerd/certs.d:/etc/docker/certs.d`) names a directory that does not exist, and every pull
        // silently bypasses every mirror.
        let cri_path = reg.and_then(|r| r.get("config_path")).and_then(toml::Value::as_str);
        for (key, path) in [("registry", cri_path), ("io.containerd.transfer.v1.local", transfer_path)] {
            if let Some(p) = path.filter(|p| p.contains(':')) {
                w.push(format!(
                    "containerd 2.x's {key} `config_path` is the list {p}: its transfer service reads it as one \
                     directory and bypasses every mirror; set it to {} alone",
                    hosts_dir.display()
                ));
            }
        }
        if !local_pull && !transfer {
            w.push(format!(
                "containerd 2.x pulls through its transfer service, which reads hosts files only from \
                 [plugins.\"io.containerd.transfer.v1.local\"] config_path: set it to {} (or set \
                 use_local_image_pull = true)",
                hosts_dir.display()
            ));
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIRROR: &str = "http://127.0.0.1:30020";

    fn entry(server: Option<&str>) -> HostEntry {
        HostEntry { registry: "registry.example:5000".into(), server: server.map(str::to_owned) }
    }

    #[test]
    fn write_keeps_operator_hosts_after_ours_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let rdir = dir.path().join("registry.example:5000");
        fs::create_dir_all(&rdir).unwrap();
        let original = "# the operator's\nserver = \"https://registry.example:5000\"\n\n\
            [host.\"https://zmirror.internal\"]\n  capabilities = [\"pull\"]\n  [host.\"https://zmirror.internal\".header]\n    x-team = [\"a\"]\n\n\
            [host.\"https://amirror.internal\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
        fs::write(rdir.join(FILE), original).unwrap();
        let e = entry(Some("http://ignored"));
        for _ in 0..2 {
            write(dir.path(), &e, MIRROR, Duration::from_secs(1)).unwrap();
        }
        let text = fs::read_to_string(rdir.join(FILE)).unwrap();
        assert!(text.starts_with(MARK));
        let ours = text.find(MIRROR).unwrap();
        let z = text.find("zmirror").unwrap();
        let a = text.find("amirror").unwrap();
        assert!(ours < z && z < a, "ours first, then the operator's in their order:\n{text}");
        assert_eq!(text.matches(MIRROR).count(), 1, "a second write does not stack mirrors");
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["server"].as_str(), Some("https://registry.example:5000"), "the operator's server wins");
        assert_eq!(t["host"][MIRROR]["dial_timeout"].as_str(), Some("1s"));
        assert_eq!(t["host"]["https://zmirror.internal"]["header"]["x-team"][0].as_str(), Some("a"));
        assert_eq!(fs::read_to_string(rdir.join(BACKUP)).unwrap(), original);

        let r = restore(dir.path()).unwrap();
        assert_eq!(r, vec![Restored::Original(rdir.join(FILE))]);
        assert_eq!(fs::read_to_string(rdir.join(FILE)).unwrap(), original);
        assert!(!rdir.join(BACKUP).exists());
        assert!(restore(dir.path()).unwrap().is_empty(), "restoring twice does nothing");
    }

    #[test]
    fn no_original_means_removed_on_restore() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), &entry(Some("http://registry.example:5000")), MIRROR, Duration::from_millis(500))
            .unwrap();
        let t: toml::Table = fs::read_to_string(&f).unwrap().parse().unwrap();
        assert_eq!(t["server"].as_str(), Some("http://registry.example:5000"));
        assert_eq!(t["host"][MIRROR]["capabilities"].as_array().unwrap().len(), 2);
        assert_eq!(restore(dir.path()).unwrap(), vec![Restored::Removed(f.clone())]);
        assert!(!f.parent().unwrap().exists());
    }

    #[test]
    fn an_operator_replacement_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), &entry(None), MIRROR, Duration::from_secs(1)).unwrap();
        fs::write(&f, "server = \"https://elsewhere\"\n").unwrap();
        assert_eq!(restore(dir.path()).unwrap(), vec![Restored::LeftAlone(f.clone())]);
        assert_eq!(fs::read_to_string(&f).unwrap(), "server = \"https://elsewhere\"\n");
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../etc", "a/b", ".hidden"] {
            let e = HostEntry { registry: bad.into(), server: None };
            assert!(matches!(write(dir.path(), &e, MIRROR, Duration::from_secs(1)), Err(HostsError::BadRegistry(_))));
        }
        let rdir = dir.path().join("r");
        fs::create_dir_all(&rdir).unwrap();
        fs::write(rdir.join(FILE), "server = [").unwrap();
        let e = HostEntry { registry: "r".into(), server: None };
        assert!(matches!(write(dir.path(), &e, MIRROR, Duration::from_secs(1)), Err(HostsError::Parse { .. })));
        assert_eq!(fs::read_to_string(rdir.join(FILE)).unwrap(), "server = [", "a file we cannot read is kept");
    }

    /// `fixtures/`: containerd 1.6's `containerd config default` (generated by Debian's containerd 1.6.20), and
    /// configs modelled on what EKS's AL2023 bootstrap (containerd 2.x) and k3s write.
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/containerd/fixtures").join(name)
    }

    #[test]
    fn preflight_reads_real_configs() {
        let hosts = Path::new("/etc/containerd/certs.d");
        // 1.6's and 1.7's defaults: config_path empty, nothing else in the way; the message names the table.
        let dir = tempfile::tempdir().unwrap();
        for name in ["containerd-1.6-default.toml", "containerd-1.7-default.toml"] {
            let w = preflight(&fixture(name), hosts);
            assert_eq!(w.len(), 1, "{name}: {w:?}");
            let fix = r#"[plugins."io.containerd.grpc.v1.cri".registry]: config_path = "/etc/containerd/certs.d""#;
            assert!(w[0].contains("`config_path` is not set") && w[0].contains(fix), "{name}: {w:?}");
            // The same file with config_path set, as an operator (or the chart's docs) would: no warning.
            let text = fs::read_to_string(fixture(name)).unwrap();
            let fixed = text.replace(r#"config_path = """#, r#"config_path = "/etc/containerd/certs.d""#);
            fs::write(dir.path().join("config.toml"), fixed).unwrap();
            assert_eq!(preflight(&dir.path().join("config.toml"), hosts), Vec::<String>::new(), "{name} fixed");
        }
        // 2.x's defaults (version 3): neither the CRI's images plugin nor the transfer service reads hosts files.
        let w = preflight(&fixture("containerd-2.x-default.toml"), hosts);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains(r#"[plugins."io.containerd.cri.v1.images".registry]: config_path"#), "{w:?}");
        assert!(w[1].contains("io.containerd.transfer.v1.local"), "{w:?}");
        // Set in both: no warning. The transfer service given EKS's list: told it bypasses every mirror.
        let text = fs::read_to_string(fixture("containerd-2.x-default.toml")).unwrap();
        let one = "config_path = '/etc/containerd/certs.d'";
        let fixed = text.replace("config_path = ''", one);
        fs::write(dir.path().join("config.toml"), &fixed).unwrap();
        assert_eq!(preflight(&dir.path().join("config.toml"), hosts), Vec::<String>::new(), "2.x fixed");
        let at = fixed.rfind(one).unwrap();
        let listed = format!(
            "{}config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'{}",
            &fixed[..at],
            &fixed[at + one.len()..]
        );
        fs::write(dir.path().join("config.toml"), listed).unwrap();
        let w = preflight(&dir.path().join("config.toml"), hosts);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("io.containerd.transfer.v1.local `config_path` is the list"), "{w:?}");
        // EKS (containerd 2.x): the list config_path, layers discarded, no transfer-service config_path.
        let w = preflight(&fixture("eks-al2023.toml"), hosts);
        assert!(w.iter().any(|m| m.contains("is the list /etc/containerd/certs.d:/etc/docker/certs.d")), "{w:?}");
        assert!(w.iter().any(|m| m.contains("discard_unpacked_layers")), "{w:?}");
        assert!(w.iter().any(|m| m.contains("io.containerd.transfer.v1.local")), "{w:?}");
        assert!(!w.iter().any(|m| m.contains("is not set")), "{w:?}");
        // k3s: its own hosts dir; an agent writing elsewhere is told where containerd looks.
        let k3s_hosts = Path::new("/var/lib/rancher/k3s/agent/etc/containerd/certs.d");
        assert_eq!(preflight(&fixture("k3s.toml"), k3s_hosts), Vec::<String>::new());
        let w = preflight(&fixture("k3s.toml"), hosts);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("/var/lib/rancher/k3s/agent/etc/containerd/certs.d"), "{w:?}");
    }

    #[test]
    fn preflight_names_each_problem() {
        let hosts = Path::new("/etc/containerd/certs.d");
        let good: toml::Table = r#"version = 2
            [plugins."io.containerd.grpc.v1.cri".registry]
              config_path = "/etc/containerd/certs.d""#
            .parse()
            .unwrap();
        assert!(check_config(&good, hosts).is_empty());
        let bad: toml::Table = r#"version = 2
            [plugins."io.containerd.grpc.v1.cri".containerd]
              discard_unpacked_layers = true
            [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
              endpoint = ["https://x"]"#
            .parse()
            .unwrap();
        let w = check_config(&bad, hosts);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].contains("config_path"));
        assert!(w[1].contains("mirrors"));
        assert!(w[2].contains("discard_unpacked_layers"));
        let v3: toml::Table = r#"version = 3
            [plugins."io.containerd.cri.v1.images".registry]
              config_path = "/etc/containerd/certs.d""#
            .parse()
            .unwrap();
        let w = check_config(&v3, hosts);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(w[0].contains("transfer"));
        let other: toml::Table = r#"version = 2
            [plugins."io.containerd.grpc.v1.cri".registry]
              config_path = "/other""#
            .parse()
            .unwrap();
        assert!(check_config(&other, hosts)[0].contains("/other"));
        // EKS's list of directories: fine for 1.x's CRI, a silent bypass for 2.x's transfer service.
        let eks_v2: toml::Table = r#"version = 2
            [plugins."io.containerd.grpc.v1.cri".registry]
              config_path = "/etc/containerd/certs.d:/etc/docker/certs.d""#
            .parse()
            .unwrap();
        assert!(check_config(&eks_v2, hosts).is_empty());
        let eks_v3: toml::Table = r#"version = 3
            [plugins."io.containerd.cri.v1.images".registry]
              config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"
            [plugins."io.containerd.transfer.v1.local"]
              config_path = "/etc/containerd/certs.d:/etc/docker/certs.d""#
            .parse()
            .unwrap();
        let w = check_config(&eks_v3, hosts);
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w.iter().all(|w| w.contains("one directory") && w.contains("/etc/containerd/certs.d alone")));
        assert!(preflight(Path::new("/nonexistent/config.toml"), hosts)[0].contains("cannot read"));
    }
}
