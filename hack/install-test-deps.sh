#!/usr/bin/env bash
# Installs, on a fresh Debian 12 machine (as root), the system packages tandem's tests use:
# filesystems and their tools for the agent's real freezes and snapshots, LVM and QEMU for the
# LVM-in-a-guest test, and the real node (containerd, runc, the CNI plugins, mmdebstrap for tandem's
# image built with no registry). Skips apt entirely when everything is already there.
set -euo pipefail
packages=(
  e2fsprogs xfsprogs btrfs-progs util-linux      # mkfs, fsck, losetup for real volumes
  lvm2 thin-provisioning-tools                    # LVM tools copied into the QEMU guest
  qemu-system-x86 busybox-static kmod cpio zstd binutils  # the LVM guest (software emulation)
  containerd runc containernetworking-plugins iptables    # the real node (kubelet's runtime, pod network)
  mmdebstrap gcc libc6-dev                        # tandem's image and the pause image, no registry
  jq                                              # hack/run-suites.sh lists the test binaries
  ceph-mon ceph-osd ceph-common                   # the single-node test Ceph (hack/ceph-mini.sh)
  librbd1 librados2                               # the libraries the controller dlopens for RBD groups
  librados-dev lz4                                # the RBD guest (hack/rbd-qemu): its mon-command helper, its initramfs
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
# The LVM guest test resolves Debian's cloud kernels from the package lists: make sure they exist.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -q
fi
if ((${#missing[@]})); then
  echo "[install-test-deps] installing: ${missing[*]}" >&2
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v go >/dev/null || { echo "Go is needed to build the test control plane" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is needed" >&2; exit 1; }
