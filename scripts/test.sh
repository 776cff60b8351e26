#!/usr/bin/env bash
# The test command: installs the Debian packages the tests need (docker-registry, containerd, skopeo, htpasswd,
# and the build tools), builds everything, runs every test with nextest (unit, property, end-to-end and the short
# chaos scenarios), then every fuzz target briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh test
# The end-to-end tests start containerd and network namespaces: they need root.
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the end-to-end tests start containerd and need root" >&2
  exit 1
fi
profile=default
[ "${CI:-}" = true ] && profile=ci
cargo build --locked --workspace --all-targets
cargo nextest run --locked --workspace --profile "$profile" "$@"
# Every fuzz target for a few seconds (SHOAL_FUZZ_SECONDS; longer runs: scripts/fuzz.sh --seconds N).
bash scripts/fuzz.sh --seconds "${SHOAL_FUZZ_SECONDS:-10}"
