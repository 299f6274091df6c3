#!/usr/bin/env bash
# Builds tandem's image with no registry and no container daemon, as OCI archives that
# `ctr -n k8s.io images import` loads into a node's containerd:
#   base       Debian bookworm minbase + hack/image/packages, configured by configure-rootfs.sh
#              (mmdebstrap; cached, rebuilt only when the package list or the script change)
#   tandem     base + one layer with the tandem binary, tagged as the chart's own image ref
#              (<image.repository>:<appVersion>), entrypoint and user as in the Dockerfile
#   pause      the pod sandbox (a static C program), so kubelet needs no registry either
#   postgres   with --postgres: the base + postgresql-15, for the application tests
#   mariadb    with --mariadb: the base + mariadb-server + mariadb-client (10.11), for the
#              quiesce hook tests
#
#   hack/image/build.sh [--postgres] [--mariadb] [TANDEM_BIN]  (default: $CARGO_TARGET_DIR/debug/tandem)
#
# Prints KEY=PATH lines (pause, tandem, tandem_config, tandem_ref, postgres, mariadb). Output folder:
# $TANDEM_IMAGE_DIR (default ~/.cache/tandem/image). Times on 2 cores: the base ~60-90 s the first
# time (mostly downloads), then the tandem image ~3-5 s (strip + hash the binary layer).
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${TANDEM_IMAGE_DIR:-$HOME/.cache/tandem/image}
postgres=false
mariadb=false
while [[ ${1:-} == --* ]]; do
  case $1 in
    --postgres) postgres=true ;;
    --mariadb) mariadb=true ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
bin=${1:-${CARGO_TARGET_DIR:-$repo/target}/debug/tandem}
[[ -x $bin ]] || { echo "build.sh: no tandem binary at $bin (cargo build --bin tandem)" >&2; exit 1; }
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
log() { printf '[image] %s\n' "$*" >&2; }

suite=bookworm
packages=$(grep -v '^#' "$here/packages" | xargs)
# rootfs NAME "PACKAGES" [HOOK]: a cached Debian rootfs tar for this package list and configuration.
rootfs() {
  local name=$1 include=$2 hook=${3:-true} key tar
  key=$( (echo "$suite $include"; cat "$hook" 2>/dev/null || echo "$hook") | sha256sum | cut -c1-16)
  tar="$out/$name-$key.tar"
  if [[ ! -f $tar ]]; then
    local partial="$out/.partial-$name.tar"  # mmdebstrap picks its output format by the suffix
    log "building the $name rootfs ($include) with mmdebstrap..."
    local start=$SECONDS
    mmdebstrap --quiet --variant=minbase --include="${include// /,}" \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --aptopt='Acquire::Languages "none"' \
      --customize-hook="$hook \"\$1\"" \
      "$suite" "$partial" >&2
    mv "$partial" "$tar"
    # older rootfs of this name are no longer used
    find "$out" -maxdepth 1 -name "$name-*.tar*" ! -name "$(basename "$tar")*" -delete
    log "built the $name rootfs in $((SECONDS - start)) s"
  fi
  echo "$tar"
}

# layer DIR TAR: a reproducible tar of DIR (owner root, no timestamps).
layer() {
  tar -C "$1" --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -cf "$2.new" .
  mv "$2.new" "$2"
}

# pause
if [[ ! -f $out/pause.oci.tar || $out/pause.oci.tar -ot $here/pause.c ]]; then
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/root"
  gcc -static -Os -o "$work/root/pause" "$here/pause.c"
  strip "$work/root/pause"
  layer "$work/root" "$out/pause-layer.tar"
  echo '{"Entrypoint":["/pause"],"WorkingDir":"/"}' > "$out/pause.config.json"
  "$here/oci-image.sh" "$out/pause.oci.tar" localhost/tandem/pause:1 "$out/pause.config.json" "$out/pause-layer.tar"
  rm -rf "$work"; trap - EXIT
fi
echo "pause=$out/pause.oci.tar"

# tandem: the chart's image ref, so `helm install` with default image values finds it.
base=$(rootfs base "$packages" "$here/configure-rootfs.sh")
repository=$(sed -n 's/^  repository: *//p' "$repo/charts/tandem/values.yaml" | head -n1)
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo/charts/tandem/Chart.yaml")
ref="$repository:$app_version"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
install -D -m 0755 "$bin" "$work/root/usr/local/bin/tandem"
strip "$work/root/usr/local/bin/tandem"
layer "$work/root" "$out/tandem-layer.tar"
# Same as the Dockerfile's ENTRYPOINT, CMD and USER (tests/real_node.rs checks).
cat > "$out/tandem.config.json" <<JSON
{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":["/usr/local/bin/tandem"],"Cmd":["--help"],"User":"65532:65532","WorkingDir":"/"}
JSON
"$here/oci-image.sh" "$out/tandem.oci.tar" "$ref" "$out/tandem.config.json" "$base" "$out/tandem-layer.tar"
echo "tandem=$out/tandem.oci.tar"
echo "tandem_config=$out/tandem.config.json"
echo "tandem_ref=$ref"
echo "base_packages=$packages"

if $postgres; then
  pg=$(rootfs postgres "postgresql-15 procps")
  if [[ ! -f $out/postgres.oci.tar || $out/postgres.oci.tar -ot $pg ]]; then
    cat > "$out/postgres.config.json" <<JSON
{"Env":["PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"Entrypoint":["/bin/sh","-c"],"Cmd":["sleep infinity"],"WorkingDir":"/"}
JSON
    "$here/oci-image.sh" "$out/postgres.oci.tar" localhost/tandem/postgres:15 "$out/postgres.config.json" "$pg"
  fi
  echo "postgres=$out/postgres.oci.tar"
  echo "postgres_ref=localhost/tandem/postgres:15"
fi

if $mariadb; then
  # The tests make their own datadir on a claim (mariadb-install-db); the image's /var/lib/mysql
  # is not used.
  maria=$(rootfs mariadb "mariadb-server mariadb-client procps")
  if [[ ! -f $out/mariadb.oci.tar || $out/mariadb.oci.tar -ot $maria ]]; then
    cat > "$out/mariadb.config.json" <<JSON
{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"Entrypoint":["/bin/sh","-c"],"Cmd":["sleep infinity"],"WorkingDir":"/"}
JSON
    "$here/oci-image.sh" "$out/mariadb.oci.tar" localhost/tandem/mariadb:10.11 "$out/mariadb.config.json" "$maria"
  fi
  echo "mariadb=$out/mariadb.oci.tar"
  echo "mariadb_ref=localhost/tandem/mariadb:10.11"
fi
