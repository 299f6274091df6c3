#!/bin/bash
# Builds the guest initramfs for the LVM test: the host's busybox-static plus the host's LVM,
# e2fsprogs, xfsprogs and util-linux binaries (with their shared libraries, via ldd), the kernel
# package's device-mapper/virtio/xfs modules (with a generated modules.dep: the .deb ships none),
# the tandem binary and the guest test script.
#
# Usage: mkinitramfs.sh MODROOT TANDEM_BIN GUEST_TEST OUT.cpio.gz
set -euo pipefail
MODROOT=$1; TANDEM=$2; GUEST_TEST=$3; OUT=$4
R=$(mktemp -d "${TMPDIR:-/tmp}/tandem-initrd.XXXXXX")
trap 'rm -rf "$R"' EXIT
mkdir -p "$R"/{bin,etc/lvm,proc,sys,dev,run,tmp,mnt,lib64,usr/lib,var/lock}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done

BINS="/sbin/lvm /sbin/dmsetup /sbin/mke2fs /sbin/e2fsck /sbin/dumpe2fs
      /usr/sbin/mkfs.xfs /usr/sbin/xfs_repair /usr/sbin/pdata_tools /bin/kmod
      /usr/bin/sha256sum /usr/bin/timeout /bin/dash /bin/mount /bin/umount $TANDEM"
for b in $BINS; do
  [ -e "$b" ] || { echo "missing $b (see hack/lvm-qemu/run.sh for the packages)" >&2; exit 1; }
  rm -f "$R/bin/$(basename "$b")"          # replaces the busybox applet of that name
  cp -L "$b" "$R/bin/"
  for l in $(ldd "$b" 2>/dev/null | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
    [ -f "$l" ] || continue
    mkdir -p "$R$(dirname "$l")"; cp -Ln "$l" "$R$l" 2>/dev/null || true
  done
done
for t in lvcreate lvremove lvs vgs pvs pvcreate vgcreate vgextend vgreduce lvchange vgchange; do ln -sf lvm "$R/bin/$t"; done
for t in thin_check thin_dump thin_repair thin_restore; do ln -sf pdata_tools "$R/bin/$t"; done
ln -sf mke2fs "$R/bin/mkfs.ext4"; ln -sf e2fsck "$R/bin/fsck.ext4"
for t in modprobe insmod lsmod depmod; do ln -sf kmod "$R/bin/$t"; done
ln -s bin "$R/sbin"; ln -s ../bin "$R/usr/bin"; ln -s ../bin "$R/usr/sbin"

KVER=$(ls "$MODROOT/lib/modules" | head -1)
M=$MODROOT/lib/modules/$KVER
mkdir -p "$R/lib/modules/$KVER"
cp "$M"/modules.order "$M"/modules.builtin* "$R/lib/modules/$KVER/"
(cd "$M" && find kernel/drivers/md kernel/drivers/virtio kernel/drivers/block kernel/fs/xfs \
   kernel/lib kernel/crypto -name '*.ko*' 2>/dev/null | cpio -pdm --quiet "$R/lib/modules/$KVER")
depmod -b "$R" "$KVER"

cat > "$R/etc/lvm/lvm.conf" <<'CONF'
devices { obtain_device_list_from_udev = 0 scan = [ "/dev" ] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 verify_udev_operations = 0 }
global { use_lvmpolld = 0 event_activation = 0 }
CONF
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
printf 'root:x:0:\ndisk:x:6:\n' > "$R/etc/group"

cat > "$R/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run; mkdir -p /run/lock/lvm /run/lvm
echo "BOOT-DONE uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
# Debian's busybox sh prefers its own applets over PATH: run the test with dash.
/bin/dash /guest-test.sh </dev/null 2>&1
echo "TEST-EXIT rc=$?"
sync
poweroff -f
INIT
chmod +x "$R/init"
cp "$GUEST_TEST" "$R/guest-test.sh"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
