#!/usr/bin/env bash
# Installs the Debian packages Shoal needs. `build` is what compiling needs (rocksdb's bindgen wants libclang);
# `test` adds the real components the end-to-end tests run: the upstream registry, containerd + ctr, skopeo,
# htpasswd and iproute2 for network namespaces.
set -euo pipefail
what=${1:-test}
build_pkgs=(build-essential clang libclang-dev pkg-config protobuf-compiler)
test_pkgs=(docker-registry containerd skopeo apache2-utils iproute2 curl ca-certificates)
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
  # --no-install-recommends: containerd recommends runc only; docker-registry must not start a system service
  # that would hold port 5000 (the tests start their own instances).
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian's docker-registry package starts a system instance on :5000; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi
