#!/usr/bin/env bash
# Builds and runs a Shoal agent with embedded defaults: mirror on 127.0.0.1:30020, metrics on 127.0.0.1:30021,
# data in ./shoal-data. Extra arguments go to `shoal agent` (e.g. --config shoal.toml, --disk-budget 50GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh build
cargo build --locked --release -p shoal-agent
exec "${CARGO_TARGET_DIR:-target}/release/shoal" agent "$@"
