//! The chart, rendered by the `helm` that `scripts/install-deps.sh` installs, as JSON objects and the API's types.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub(crate) fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every object of a multi-document YAML stream, as JSON values.
pub(crate) fn objects(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = serde_json::Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The objects of one kind, typed.
pub(crate) fn all<T: serde::de::DeserializeOwned>(objs: &[serde_json::Value], kind: &str) -> Result<Vec<T>> {
    objs.iter()
        .filter(|o| o["kind"] == kind)
        .map(|o| serde_json::from_value(o.clone()).with_context(|| format!("a {kind} that is not a valid {kind}")))
        .collect()
}

pub(crate) fn one<T: serde::de::DeserializeOwned>(objs: &[serde_json::Value], kind: &str, name: &str) -> Result<T> {
    let found: Vec<_> = objs.iter().filter(|o| o["kind"] == kind && o["metadata"]["name"] == name).collect();
    match found.as_slice() {
        [o] => Ok(serde_json::from_value((*o).clone())?),
        _ => bail!("expected one {kind} named {name}, found {}", found.len()),
    }
}

pub(crate) fn helm() -> Result<PathBuf> {
    for candidate in [std::env::var_os("SHOAL_HELM").map(PathBuf::from), Some("/opt/shoal-tools/bin/helm".into())] {
        if let Some(p) = candidate.filter(|p| p.exists()) {
            return Ok(p);
        }
    }
    bail!("helm not found: scripts/install-deps.sh installs it in /opt/shoal-tools/bin (or set SHOAL_HELM)")
}

pub(crate) fn helm_template(extra: &[&str]) -> Result<String> {
    let out = Command::new(helm()?)
        .args(["template", "shoal", "helm/shoal", "--namespace", "shoal-system"])
        .args(extra)
        .current_dir(deploy_dir())
        .output()?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
