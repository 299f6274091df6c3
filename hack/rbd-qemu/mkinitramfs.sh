#!/bin/bash
# Builds the guest initramfs for the RBD test (about 4 s; ~170 MB unpacked): the host's
# busybox-static; the host's Ceph 16.2 daemons and `rbd` CLI, librbd and librados (which tandem
# dlopens, so ldd of tandem does not show them), Ceph's dlopened plugins and every rados object
# class (ldd does not see those either: without libcls_rbd.so and libcls_lock.so no RBD call
# works), each with its ldd closure; e2fsprogs, xfsprogs and util-linux; the kernel package's
# rbd/libceph/xfs modules (with a generated modules.dep: the .deb ships none); the Ceph state the
# host prepared (config, keys, mon store, OSD dir); cephcmd; tandem and the guest test.
#
# Usage: mkinitramfs.sh MODROOT TANDEM_BIN CEPHCMD CEPH_DIR GUEST_TEST OUT.cpio.gz
set -euo pipefail
MODROOT=$1; TANDEM=$2; CEPHCMD=$3; CEPH_DIR=$4; GUEST_TEST=$5; OUT=$6
R=$(mktemp -d "${TMPDIR:-/tmp}/tandem-rbd-initrd.XXXXXX")
trap 'rm -rf "$R"' EXIT
mkdir -p "$R"/{bin,etc,proc,sys,dev,run,tmp,mnt,lib64,usr/lib,var/lock,root}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done

libs() { # libs FILE: copies FILE's shared libraries (ldd closure) to their host paths
  for l in $(ldd "$1" 2>/dev/null | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
    [ -f "$l" ] && [ ! -e "$R$l" ] || continue
    mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"
  done
}
BINS="/usr/bin/ceph-mon /usr/bin/ceph-osd /usr/bin/rbd
      /sbin/mke2fs /sbin/e2fsck /usr/sbin/mkfs.xfs /usr/sbin/xfs_repair /bin/kmod
      /usr/bin/sha256sum /usr/bin/timeout /bin/dash /bin/mount /bin/umount $CEPHCMD $TANDEM"
for b in $BINS; do
  [ -e "$b" ] || { echo "missing $b (see hack/rbd-qemu/run.sh for the packages)" >&2; exit 1; }
  rm -f "$R/bin/$(basename "$b")"          # replaces the busybox applet of that name
  cp -L "$b" "$R/bin/"; libs "$b"
done
# What tandem dlopens, and what Ceph dlopens (compressor/crypto/erasure-code plugins, the OSD's
# object classes), each with its own closure.
for so in /usr/lib/x86_64-linux-gnu/librbd.so.1 /usr/lib/x86_64-linux-gnu/librados.so.2; do
  [ -e "$so" ] || { echo "missing $so (librbd1, librados2)" >&2; exit 1; }
  mkdir -p "$R$(dirname "$so")"; cp -L "$so" "$R$so"; libs "$so"
done
for d in /usr/lib/x86_64-linux-gnu/ceph /usr/lib/x86_64-linux-gnu/rados-classes; do
  mkdir -p "$R$d"; cp -a "$d/." "$R$d/"
  find "$d" -name '*.so*' -type f | while read -r so; do libs "$so"; done
done
ln -sf mke2fs "$R/bin/mkfs.ext4"; ln -sf e2fsck "$R/bin/fsck.ext4"
for t in modprobe insmod lsmod depmod; do ln -sf kmod "$R/bin/$t"; done
ln -s bin "$R/sbin"; ln -s ../bin "$R/usr/bin"; ln -s ../bin "$R/usr/sbin"

KVER=$(ls "$MODROOT/lib/modules" | head -1)
M=$MODROOT/lib/modules/$KVER
mkdir -p "$R/lib/modules/$KVER"
cp "$M"/modules.order "$M"/modules.builtin* "$R/lib/modules/$KVER/"
(cd "$M" && find kernel/net/ceph kernel/net/dns_resolver kernel/drivers/block/rbd.ko* kernel/fs/xfs \
   kernel/lib kernel/crypto kernel/arch/x86/crypto -name '*.ko*' 2>/dev/null | cpio -pdm --quiet "$R/lib/modules/$KVER")
depmod -b "$R" "$KVER"

echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
printf 'root:x:0:\ndisk:x:6:\nceph:x:64045:\n' > "$R/etc/group"
printf '127.0.0.1 localhost guest\n' > "$R/etc/hosts"
cp -a "$CEPH_DIR" "$R/ceph"

cat > "$R/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
hostname guest
# -nic none: the loopback is all there is, and it starts down.
ip link set lo up
echo "BOOT-DONE uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
# Debian's busybox sh prefers its own applets over PATH: run the test with dash.
/bin/dash /guest-test.sh </dev/null 2>&1
echo "TEST-EXIT rc=$?"
sync
poweroff -f
INIT
chmod +x "$R/init"
cp "$GUEST_TEST" "$R/guest-test.sh"
# The end-to-end part (run.sh with E2E_KUBECONFIG): the guest's kubeconfig, the API port, the bridge.
if [ -n "${E2E_DIR:-}" ]; then cp -a "$E2E_DIR" "$R/e2e"; libs "$E2E_DIR/serial-bridge"; fi
# lz4 unpacks several times faster than gzip under TCG (the kernel does it before /init runs).
(cd "$R" && find . | cpio -o -H newc --quiet | lz4 -l -1 -q) > "$OUT"
