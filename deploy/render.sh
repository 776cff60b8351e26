#!/usr/bin/env bash
# Renders the plain manifests in deploy/kustomize/shoal.yaml from the Helm chart, so both install paths come from
# one source. CI runs this with --check and fails when the committed file differs from a fresh render.
# The plain manifests take the cluster secret from kustomize's secretGenerator (a file you create at install,
# see docs/operations.md) and have no uninstall hook (Helm hooks do not exist for kubectl).
set -euo pipefail
cd "$(dirname "$0")"
helm=${HELM:-helm}
out=kustomize/shoal.yaml
render() {
  echo "# Rendered from deploy/helm/shoal by deploy/render.sh: edit the chart, not this file."
  "$helm" template shoal helm/shoal --namespace shoal-system --include-crds \
    --set createNamespace=true \
    --set clusterSecret.existingSecret=shoal-cluster-secret \
    --set uninstallHook.enabled=false
}
if [ "${1:-}" = --check ]; then
  if ! diff -u "$out" <(render); then
    echo "deploy/render.sh: $out is out of date with the chart: run deploy/render.sh" >&2
    exit 1
  fi
else
  render > "$out"
fi
