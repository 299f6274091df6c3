#!/bin/bash
# RBD group snapshots cut inside the freeze of tandem's real agents, in a QEMU guest (TCG: software
# emulation; the CI host kernel has no rbd module and its /dev/kvm cannot run stock kernels) with
# krbd and a single-node Ceph (1 mon, 1 memstore OSD, cephx) on the guest's own 127.0.0.1. The
# guest has no network (-nic none). guest-test.sh says what is checked.
#
#   hack/rbd-qemu/run.sh
#   TANDEM_BIN=target/release/tandem hack/rbd-qemu/run.sh
#
# With E2E_KUBECONFIG (a kubeconfig for https://127.0.0.1:PORT) and E2E_API (that address on the
# host) the guest also runs the whole product against that API server: `tandem controller` and
# two `tandem agent`s, reaching it through serial-bridge over a virtio-serial port (never a guest
# network), on the objects of namespace E2E_NAMESPACE; tests/rbd_qemu.rs sets that up.
# CEPH_ADMIN_KEY, if set, is client.admin's key.
#
# Installs nothing. Needs (Debian packages): qemu-system-x86 ceph-mon ceph-osd ceph-common
#   librados-dev gcc libc6-dev busybox-static xfsprogs e2fsprogs kmod cpio lz4 binutils, and
#   `apt-get update` done once (the kernel package is resolved with apt-cache, fetched with apt-get
#   download). Shares hack/lvm-qemu's kernel cache (~/.cache/tandem/lvm-qemu).
# Takes 4-5.5 min on this 2-core CI host while other builds run (load 5-9): host preparation
# 9-25 s (25 with a cold kernel cache), guest boot 12-17 s, guest test 3.5-4.5 min, most of it the
# start-up of Ceph's C++ binaries (rbd, ceph-mon, ceph-osd) under TCG.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${TANDEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/lvm-qemu}
TIMEOUT=${TIMEOUT:-900}
PACKAGES="qemu-system-x86 ceph-mon ceph-osd ceph-common librados-dev gcc libc6-dev busybox-static xfsprogs e2fsprogs kmod cpio lz4 binutils"

missing=""
for t in qemu-system-x86_64 /bin/busybox ceph-mon ceph-osd rbd ceph-authtool monmaptool gcc mkfs.xfs mke2fs \
         depmod cpio lz4 strip apt-get dpkg-deb /usr/include/rados/librados.h /usr/lib/x86_64-linux-gnu/librbd.so.1; do
  command -v "$t" >/dev/null 2>&1 || [ -e "$t" ] || missing="$missing $t"
done
if [ -n "$missing" ]; then
  echo "missing:$missing" >&2
  echo "install with: apt-get update && apt-get install -y --no-install-recommends $PACKAGES" >&2
  exit 2
fi

t_start=$(date +%s.%N)
TANDEM_BIN=${TANDEM_BIN:-$ROOT/target/debug/tandem}
if [ ! -x "$TANDEM_BIN" ] || [ -n "${REBUILD:-}" ]; then
  (cd "$ROOT" && cargo build --bin tandem)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-rbd-qemu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 1' HUP INT TERM          # so the EXIT trap cleans up on a signal too
# Debug info is most of a debug build's size; the guest does not need it.
strip -o "$WORK/tandem" "$TANDEM_BIN"
gcc -O2 -Wall -o "$WORK/cephcmd" "$HERE/cephcmd.c" -lrados
E2E_DIR=""; QEMU_E2E=()
if [ -n "${E2E_KUBECONFIG:-}" ]; then
  [ -n "${E2E_API:-}" ] || { echo "E2E_KUBECONFIG needs E2E_API (host:port of the API server)" >&2; exit 2; }
  E2E_DIR=$WORK/e2e; mkdir -p "$E2E_DIR"
  rustc --edition 2021 -O -o "$E2E_DIR/serial-bridge" "$HERE/serial-bridge.rs"
  cp "$E2E_KUBECONFIG" "$E2E_DIR/kubeconfig"
  echo "${E2E_API##*:}" > "$E2E_DIR/port"
  echo "${E2E_NAMESPACE:-default}" > "$E2E_DIR/namespace"
fi
mkdir -p "$CACHE"

# The same 6.12 cloud kernel the LVM guest runs (its rbd.ko, libceph.ko, xfs.ko), from that cache.
pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.]+\+deb12-cloud-amd64$' | awk '{print $1}' | sort -V | tail -1)
if [ -z "$pkg" ]; then echo "cannot resolve a 6.12 cloud kernel package (run apt-get update)" >&2; exit 2; fi
deb=$(ls "$CACHE"/"${pkg}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  (cd "$CACHE" && apt-get download "$pkg" >/dev/null)
  deb=$(ls "$CACHE"/"${pkg}"_*.deb | head -1)
fi
tree=$CACHE/x-$(basename "$deb" .deb)
if [ ! -d "$tree" ]; then
  rm -rf "$tree.tmp"; mkdir -p "$tree.tmp"; dpkg-deb -x "$deb" "$tree.tmp"; mv "$tree.tmp" "$tree"
fi
vmlinuz=$(ls "$tree"/boot/vmlinuz-* | head -1)

# The Ceph state that needs no daemon is made here, where a Ceph process starts in ~40 ms instead
# of ~1 s: config, keys, monmap, the mon store (ceph-mon --mkfs) and the memstore OSD's dir
# (ceph-osd --mkfs --no-mon-config). Nothing listens on the host. The guest then only starts
# the two daemons and registers the OSD and the pool (guest-test.sh).
# ceph_conf DIR: the config, for the state at DIR (the host's staging dir, or /ceph in the guest).
ceph_conf() {
  cat <<CONF
[global]
fsid = $FSID
mon_host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $1/\$cluster.\$name.keyring
# one OSD: size-1 pools, 8 PGs, no mgr (its absence must never turn the health red)
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
run_dir = $1/run
admin_socket = $1/run/\$cluster-\$name.asok
pid_file = $1/run/\$name.pid
log_file = $1/log/\$name.log
mon_cluster_log_file = $1/log/\$cluster.log
crash_dir = $1/crash
[client]
# rbd clients run in parallel: no shared admin socket
admin_socket =
[mon]
mon_data = $1/mon/\$cluster-\$id
keyring = $1/mon/\$cluster-\$id/keyring
mon_initial_members = a
# default 1 s: every snapshot op waits for the next paxos proposal otherwise
paxos_propose_interval = 0.05
mon_mgr_mkfs_grace = 31536000
[osd]
osd_data = $1/osd/\$cluster-\$id
keyring = $1/osd/\$cluster-\$id/keyring
osd_objectstore = memstore
memstore_device_bytes = 2147483648
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
CONF
}
C=$WORK/ceph
mkdir -p "$C"/{run,log,crash,mon,osd/ceph-0}
FSID=$(cat /proc/sys/kernel/random/uuid); OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
ceph_conf "$C" > "$WORK/host.conf"
ceph_conf /ceph > "$C/ceph.conf"
(
  export CEPH_CONF=$WORK/host.conf
  ceph-authtool --create-keyring "$WORK/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
  admin_key=(--gen-key); [ -n "${CEPH_ADMIN_KEY:-}" ] && admin_key=(--add-key "$CEPH_ADMIN_KEY")
  ceph-authtool --create-keyring "$C/ceph.client.admin.keyring" "${admin_key[@]}" -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'
  ceph-authtool --create-keyring "$C/osd/ceph-0/keyring" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd'
  # The mon's initial auth database holds every key: the guest needs no `auth add`.
  ceph-authtool "$WORK/mon.keyring" --import-keyring "$C/ceph.client.admin.keyring"
  ceph-authtool "$WORK/mon.keyring" --import-keyring "$C/osd/ceph-0/keyring"
  monmaptool --create --fsid "$FSID" --enable-all-features \
    --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$WORK/monmap"
  ceph-mon --mkfs -i a --monmap "$WORK/monmap" --keyring "$WORK/mon.keyring"
  ceph-osd --mkfs -i 0 --osd-uuid "$OSD_UUID" --no-mon-config --keyring "$C/osd/ceph-0/keyring" 2>/dev/null
  # tandem's --key-file: the bare secret, as `ceph auth get-key` prints it.
  ceph-authtool -p -n client.admin "$C/ceph.client.admin.keyring" > "$C/admin.key"
) >"$WORK/ceph-prep.log" 2>&1 || { cat "$WORK/ceph-prep.log" >&2; echo "preparing the Ceph state failed" >&2; exit 1; }
echo "$OSD_UUID" > "$C/osd-uuid"
rm -rf "$C"/run/* "$C"/log/*

E2E_DIR=$E2E_DIR bash "$HERE/mkinitramfs.sh" "$tree" "$WORK/tandem" "$WORK/cephcmd" "$C" "$HERE/guest-test.sh" "$WORK/initrd.lz4"
t_ready=$(date +%s.%N)
echo "initramfs: $(( $(stat -c %s "$WORK/initrd.lz4") / 1048576 )) MiB (lz4)"
log=$WORK/console.log
if [ -n "$E2E_DIR" ]; then
  # QEMU connects to the bridge's socket at start; each guest connection becomes one to E2E_API.
  "$E2E_DIR/serial-bridge" host "$WORK/api.sock" "$E2E_API" 2>"$WORK/bridge.log" &
  BRIDGE=$!
  trap 'kill $BRIDGE 2>/dev/null || true; rm -rf "$WORK"' EXIT
  for _ in $(seq 50); do [ -S "$WORK/api.sock" ] && break; sleep 0.1; done
  QEMU_E2E=(-device virtio-serial-pci -chardev "socket,id=api,path=$WORK/api.sock"
            -device virtserialport,chardev=api,name=tandem.api)
fi
set +e
# 2 vCPUs (multi-threaded TCG) and 3 GiB: ceph-osd with memstore holds the images' data in RAM.
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 3072 -smp 2 -nographic -no-reboot -nic none \
  "${QEMU_E2E[@]}" -kernel "$vmlinuz" -initrd "$WORK/initrd.lz4" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3" >"$log" 2>&1
qrc=$?
set -e
t_end=$(date +%s.%N)
tr -d '\r' <"$log" | sed -n '/BOOT-DONE/,$p' >"$log.clean"
echo "================ rbd-qemu ($pkg): console"
cat "$log.clean"
ok=1
grep -q 'TEST-EXIT rc=0' "$log.clean" || ok=0
grep -q 'GUEST-RESULT pass=[0-9]* fail=0' "$log.clean" || ok=0
grep -q '^BENCH ' "$log.clean" || ok=0
[ -s "$log.clean" ] || { echo "no console output after BOOT-DONE; raw log:"; tail -30 "$log"; }
boot=$(sed -n 's/.*BOOT-DONE uptime=\([0-9.]*\).*/\1/p' "$log.clean")
awk -v a="$t_start" -v b="$t_ready" -v c="$t_end" -v boot="${boot:-0}" -v ok="$ok" -v q="$qrc" 'BEGIN{
  printf "rbd-qemu: %s (qemu rc=%d; host prepare %.1fs, guest boot %.1fs, guest test + poweroff %.1fs, total %.1fs)\n",
    ok ? "PASS" : "FAIL", q, b-a, boot, c-b-boot, c-a }'
[ $ok = 1 ]
