# syntax=docker/dockerfile:1
# The one image of tandem: `tandem controller` (Deployment) and `tandem agent` (DaemonSet) both run
# /usr/local/bin/tandem from it.
#
#   docker build -t ghcr.io/tandem-dev/tandem:0.1.0 .
#
# Build stage: the Rust toolchain CI tests with (1.95; Cargo.toml's rust-version is the floor), on
# the same Debian as the runtime (same glibc). The whole crate goes in (cargo reads every target the
# manifest names, benches included); BuildKit cache mounts keep the registry and target/ between
# builds, so a source edit rebuilds only tandem.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tandem \
 && install -m 0755 target/release/tandem /usr/local/bin/tandem \
 && strip /usr/local/bin/tandem \
 && /usr/local/bin/tandem --version

# Runtime: the agent runs lvcreate/lvremove (LVM backends); everything else it does with syscalls
# (FIFREEZE/FITHAW, FICLONE, btrfs ioctls, mount). The controller needs only the binary.
# In a container there is no udev to wait for: LVM must create its device nodes itself and not ask
# udev for the device list (otherwise lvcreate hangs or finds no devices).
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends lvm2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && sed -i \
      -e 's/^\(\s*\)#\?\s*udev_sync = .*/\1udev_sync = 0/' \
      -e 's/^\(\s*\)#\?\s*udev_rules = .*/\1udev_rules = 0/' \
      -e 's/^\(\s*\)#\?\s*obtain_device_list_from_udev = .*/\1obtain_device_list_from_udev = 0/' \
      /etc/lvm/lvm.conf \
 && grep -Eq '^\s*udev_sync = 0' /etc/lvm/lvm.conf \
 && grep -Eq '^\s*udev_rules = 0' /etc/lvm/lvm.conf
COPY --from=build /usr/local/bin/tandem /usr/local/bin/tandem
# The controller runs as this user (the chart's default); the agent's pod sets runAsUser 0.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tandem"]
CMD ["--help"]
