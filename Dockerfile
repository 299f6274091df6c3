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

# Runtime: the agent runs lvs/lvcreate/lvremove (LVM backends); everything else it does with
# syscalls (FIFREEZE/FITHAW, FICLONE, btrfs snapshot ioctls, mount). The controller loads librbd1
# (and librados2) for RBD group snapshots, nothing else. The packages are hack/image/packages and
# the configuration hack/image/configure-rootfs.sh (LVM without udev), the same as the image
# hack/image/build.sh makes with no registry (tests/real_node.rs checks that both agree).
FROM docker.io/library/debian:bookworm-slim
RUN --mount=type=bind,source=hack/image/configure-rootfs.sh,target=/configure-rootfs.sh \
    apt-get update \
 && apt-get install -y --no-install-recommends lvm2 ca-certificates librbd1 \
 && rm -rf /var/lib/apt/lists/* \
 && sh /configure-rootfs.sh /
COPY --from=build /usr/local/bin/tandem /usr/local/bin/tandem
# The controller runs as this user (the chart's default); the agent's pod sets runAsUser 0.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tandem"]
CMD ["--help"]
