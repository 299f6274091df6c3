#!/usr/bin/env bash
# Writes an OCI image archive from rootfs tarballs, one uncompressed layer per tar (no registry,
# no daemon, no Dockerfile: tar, sha256sum and three JSON files), for `ctr images import`.
# A base layer shared by several images has one digest, so containerd stores it once.
#
#   oci-image.sh OUT.oci.tar REF CONFIG.json LAYER.tar [LAYER.tar...]
#
# CONFIG.json is the image's "config" object (Env, Entrypoint, Cmd, User, WorkingDir).
# A LAYER.tar.sha256 file next to a layer, newer than it, saves hashing it again.
set -euo pipefail
out=$1 ref=$2 config=$3
shift 3
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-oci.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/blobs/sha256"

digest_of() {
  local file=$1 cache=$1.sha256
  if [[ -f $cache && $cache -nt $file ]]; then cat "$cache"; return; fi
  local sha
  sha=$(sha256sum "$file" | cut -d' ' -f1)
  echo "$sha" > "$cache.new" && mv "$cache.new" "$cache"
  echo "$sha"
}

diff_ids=() layers=()
for layer in "$@"; do
  sha=$(digest_of "$layer")
  ln "$layer" "$work/blobs/sha256/$sha" 2>/dev/null || cp "$layer" "$work/blobs/sha256/$sha"
  diff_ids+=("\"sha256:$sha\"")
  layers+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$sha\",\"size\":$(stat -c %s "$layer")}")
done
join() { local IFS=,; echo "$*"; }

blob() { # FILE -> moves it to blobs/, prints "digest size"
  local sha size
  sha=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$work/blobs/sha256/$sha"
  echo "$sha $size"
}
printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":[%s]},"history":[{"created_by":"hack/image/oci-image.sh"}]}' \
  "$(cat "$config")" "$(join "${diff_ids[@]}")" > "$work/config.json"
read -r config_sha config_size < <(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
  "$config_sha" "$config_size" "$(join "${layers[@]}")" > "$work/manifest.json"
read -r manifest_sha manifest_size < <(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_sha" "$manifest_size" "$ref" "${ref##*:}" > "$work/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci-layout"
tar -C "$work" --hard-dereference -cf "$out.new" oci-layout index.json blobs
mv "$out.new" "$out"
