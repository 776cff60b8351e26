#!/usr/bin/env bash
# Builds the agent's container image as an OCI image layout, without a Docker engine: the agent binary stripped,
# the shared libraries it links and their loader, CA certificates, an empty /tmp; nothing else (no shell, no
# package manager). Reproducible: the same binary, sources and SOURCE_DATE_EPOCH give the same digest (file times,
# owners, order and compression are fixed). Prints the manifest's digest on stdout.
#
#   scripts/image.sh [--binary PATH] [--out DIR] [--tag TAG]
#   scripts/image.sh [--binary PATH] --rootfs DIR   (only the files, for the Dockerfile beside this script)
#
#   --binary  the `shoal` binary (default: the release build in $CARGO_TARGET_DIR or target/)
#   --out     the OCI layout directory to write (default: target/image/shoal; replaced)
#   --tag     the reference name in the layout's index (default: the workspace version)
#
# Push it with skopeo: skopeo copy oci:target/image/shoal:0.1.0 docker://registry.example/shoal:0.1.0
# Labels (org.opencontainers.image.*): source (SHOAL_IMAGE_SOURCE), revision (git HEAD), version, created
# (SOURCE_DATE_EPOCH, default: the last commit's time).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
binary=$target/release/shoal
out=$target/image/shoal
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -1)
tag=$version
rootfs_only=
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --rootfs) rootfs_only=$2; shift 2 ;;
    *) echo "scripts/image.sh: unknown argument $1 (usage: scripts/image.sh [--binary PATH] [--out DIR] [--tag TAG] [--rootfs DIR])" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "scripts/image.sh: no agent binary at $binary (cargo build --release -p shoal-agent --bin shoal, or --binary)" >&2; exit 1; }
source_url=${SHOAL_IMAGE_SOURCE:-https://github.com/shoal-project/shoal}
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
# Everything below lands in JSON as is: refuse what would need escaping.
for v in "$tag" "$version" "$revision" "$source_url"; do
  case "$v" in *[\"\\]*|*[[:cntrl:]]*) echo "scripts/image.sh: refusing a label or tag with quotes, backslashes or control characters: $v" >&2; exit 1 ;; esac
done
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) echo "scripts/image.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=${rootfs_only:-$work/rootfs}
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp"
strip --strip-all -o "$rootfs/usr/local/bin/shoal" "$binary"
# The libraries the binary links, and the dynamic loader, at the paths the binary looks for them.
ldd "$binary" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }' | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
find "$rootfs" -type d -exec chmod 0755 {} +
find "$rootfs" -type f -exec chmod 0644 {} +
find "$rootfs/usr/local/bin" "$rootfs/lib" "$rootfs/lib64" "$rootfs/usr/lib" -type f -exec chmod 0755 {} + 2>/dev/null || true
chmod 1777 "$rootfs/tmp"
if [ -n "$rootfs_only" ]; then
  echo "scripts/image.sh: the image's files are in $rootfs" >&2
  exit 0
fi

mkdir -p "$work/blobs/sha256"
tar --format=gnu --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$work/layer.tar" > "$work/layer.tar.gz"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$work/blobs/sha256/$layer"

labels="\"org.opencontainers.image.source\":\"$source_url\",\"org.opencontainers.image.revision\":\"$revision\",\"org.opencontainers.image.version\":\"$version\",\"org.opencontainers.image.created\":\"$created\",\"org.opencontainers.image.title\":\"shoal\",\"org.opencontainers.image.licenses\":\"Apache-2.0\""
printf '{"architecture":"%s","os":"linux","created":"%s","config":{"Entrypoint":["/usr/local/bin/shoal"],"Cmd":["agent"],"Env":["PATH=/usr/local/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],"WorkingDir":"/","Labels":{%s}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"scripts/image.sh"}]}' \
  "$arch" "$created" "$labels" "$diff_id" "$created" > "$work/config.json"
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
config_size=$(stat -c %s "$work/config.json")
mv "$work/config.json" "$work/blobs/sha256/$config"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}],"annotations":{%s}}' \
  "$config" "$config_size" "$layer" "$layer_size" "$labels" > "$work/manifest.json"
manifest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
manifest_size=$(stat -c %s "$work/manifest.json")
mv "$work/manifest.json" "$work/blobs/sha256/$manifest"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$arch" "$tag" > "$work/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$work/oci-layout"

rm -rf "$out"
mkdir -p "$(dirname "$out")"
mkdir "$out"
mv "$work/blobs" "$work/index.json" "$work/oci-layout" "$out/"
echo "scripts/image.sh: $out ($tag): layer $((layer_size / 1024 / 1024)) MiB compressed" >&2
echo "sha256:$manifest"
