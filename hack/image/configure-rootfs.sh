#!/bin/sh
# Configures a Debian rootfs for tandem's image (the Dockerfile runs it too, so both images agree).
# In a container there is no udev to wait for: LVM must create its device nodes itself and not ask
# udev for the device list (otherwise lvcreate hangs or finds no devices).
#   configure-rootfs.sh ROOT
set -eu
root=${1:?usage: configure-rootfs.sh ROOT}
conf="$root/etc/lvm/lvm.conf"
sed -i \
  -e 's/^\(\s*\)#\?\s*udev_sync = .*/\1udev_sync = 0/' \
  -e 's/^\(\s*\)#\?\s*udev_rules = .*/\1udev_rules = 0/' \
  -e 's/^\(\s*\)#\?\s*obtain_device_list_from_udev = .*/\1obtain_device_list_from_udev = 0/' \
  "$conf"
grep -Eq '^\s*udev_sync = 0' "$conf"
grep -Eq '^\s*udev_rules = 0' "$conf"
grep -Eq '^\s*obtain_device_list_from_udev = 0' "$conf"
