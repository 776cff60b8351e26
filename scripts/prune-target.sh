#!/usr/bin/env bash
# Frees what a long-lived cargo target dir accumulates: in each profile's deps/, every executable but the newest of
# its name (test and bench binaries of earlier builds), and incremental state. Dependencies' libraries stay, so the
# next build is still incremental where it matters. Usage: scripts/prune-target.sh TARGET_DIR
set -euo pipefail
target=${1:?usage: scripts/prune-target.sh TARGET_DIR}
[ -d "$target" ] || exit 0
for deps in "$target"/*/deps "$target"/*/*/deps; do
  [ -d "$deps" ] || continue
  # name-HASH executables, newest first; a name seen before is an older build of it.
  find "$deps" -maxdepth 1 -type f -perm -u+x ! -name '*.*' -printf '%T@ %p\n' | sort -rn |
    while read -r _ path; do
      name=$(basename "$path")
      echo "${name%-*} $path"
    done | awk 'seen[$1]++ { print $2 }' | xargs -r rm -f
done
rm -rf "$target"/*/incremental
