#!/bin/bash
# LVM thin and thick snapshots (and restore clones of them) by the real tandem agent, inside QEMU guests (TCG: software emulation;
# the CI host kernel has no device-mapper and its /dev/kvm cannot run stock kernels).
#
#   hack/lvm-qemu/run.sh                 # both kernels: Debian 12's 6.12 (must work) and 6.1 (must
#                                        # report the frozen-origin EBUSY honestly)
#   KERNELS="6.12" hack/lvm-qemu/run.sh  # one kernel
#   TANDEM_BIN=target/release/tandem hack/lvm-qemu/run.sh
#
# Installs nothing. Needs (Debian packages): qemu-system-x86 lvm2 thin-provisioning-tools
#   busybox-static xfsprogs e2fsprogs kmod cpio binutils, and `apt-get update` done once (the
#   kernel packages are resolved with apt-cache and fetched with apt-get download).
# Caches the kernel .debs and their extracted trees under ~/.cache/tandem/lvm-qemu.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${TANDEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/lvm-qemu}
KERNELS=${KERNELS:-"6.12 6.1"}
TIMEOUT=${TIMEOUT:-900}
PACKAGES="qemu-system-x86 lvm2 thin-provisioning-tools busybox-static xfsprogs e2fsprogs kmod cpio binutils"

missing=""
for t in qemu-system-x86_64 /bin/busybox lvm pdata_tools mkfs.xfs mke2fs depmod cpio strip apt-get dpkg-deb; do
  command -v "$t" >/dev/null 2>&1 || missing="$missing $t"
done
if [ -n "$missing" ]; then
  echo "missing:$missing" >&2
  echo "install with: apt-get update && apt-get install -y --no-install-recommends $PACKAGES" >&2
  exit 2
fi

TANDEM_BIN=${TANDEM_BIN:-$ROOT/target/debug/tandem}
if [ ! -x "$TANDEM_BIN" ] || [ -n "${REBUILD:-}" ]; then
  (cd "$ROOT" && cargo build --bin tandem)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-lvm-qemu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# Debug info is most of a debug build's size; the guest does not need it.
strip -o "$WORK/tandem" "$TANDEM_BIN"
mkdir -p "$CACHE"

resolve_kernel() {
  case $1 in
    6.1) apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-6\.1\./{print $2; exit}' ;;
    *)   apt-cache search --names-only "^linux-image-${1//./\\.}\\.[0-9.]+\\+deb12-cloud-amd64\$" | awk '{print $1}' | sort -V | tail -1 ;;
  esac
}

overall=0
summary=""
for series in $KERNELS; do
  t_start=$(date +%s.%N)
  pkg=$(resolve_kernel "$series")
  if [ -z "$pkg" ]; then echo "cannot resolve a kernel package for $series (run apt-get update)" >&2; exit 2; fi
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
  bash "$HERE/mkinitramfs.sh" "$tree" "$WORK/tandem" "$HERE/guest-test.sh" "$WORK/initrd-$series.gz"
  t_ready=$(date +%s.%N)
  disk=$WORK/disk-$series.img
  truncate -s 4G "$disk"
  # A second disk for L11: a tenant's raw block device carrying a fake vg0 header.
  tenant_disk=$WORK/tenant-$series.img
  truncate -s 64M "$tenant_disk"
  log=$WORK/console-$series.log
  set +e
  timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 1536 -smp 2 -nographic -no-reboot \
    -kernel "$vmlinuz" -initrd "$WORK/initrd-$series.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" \
    -drive file="$disk",if=virtio,format=raw,cache=unsafe \
    -drive file="$tenant_disk",if=virtio,format=raw,cache=unsafe >"$log" 2>&1
  qrc=$?
  set -e
  rm -f "$disk" "$tenant_disk"
  t_end=$(date +%s.%N)
  tr -d '\r' <"$log" | sed -n '/BOOT-DONE/,$p' >"$log.clean"
  echo "================ kernel $series ($pkg): console"
  cat "$log.clean"
  ok=1
  grep -q 'TEST-EXIT rc=0' "$log.clean" || ok=0
  grep -q 'GUEST-RESULT pass=[0-9]* fail=0' "$log.clean" || ok=0
  case $series in
    6.1) want=FrozenOriginBusy ;;   # no freeze holders: lvcreate -s of a frozen origin gets EBUSY
    *)   want=Released ;;
  esac
  grep -q "OUTCOME thin-required $want" "$log.clean" || ok=0
  grep -q "OUTCOME thick-required $want" "$log.clean" || ok=0
  prep=$(awk -v a="$t_start" -v b="$t_ready" 'BEGIN{printf "%.1f", b-a}')
  guest=$(awk -v a="$t_ready" -v b="$t_end" 'BEGIN{printf "%.1f", b-a}')
  line="kernel $series ($pkg): $( [ $ok = 1 ] && echo PASS || echo FAIL ) (expected $want; qemu rc=$qrc; prepare ${prep}s, guest ${guest}s)"
  echo "$line"
  summary="$summary$line"$'\n'
  [ $ok = 1 ] || overall=1
done
echo "================ summary"
printf '%s' "$summary"
exit $overall
