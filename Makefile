# tandem: the two things a fresh machine needs (see README.md), and their parts.
.PHONY: test demo demo-node deps tools lint suites unit model lvm-qemu crds bench

## Everything CI runs: system packages, the test control plane, lint, every test (the Rust test
## binaries and the LVM guests, in two lanes at once: hack/run-suites.sh).
test: deps tools lint suites

suites:
	hack/run-suites.sh

deps:
	hack/install-test-deps.sh

tools:
	hack/test-tools.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

unit:
	cargo test --lib --bins --tests

## The model check of the barrier and the agents' cuts alone (it also runs in `unit`).
model:
	cargo test --test model_check -- --nocapture

## LVM thin and thick for real, inside QEMU guests (Debian 6.12 and 6.1 kernels).
lvm-qemu:
	bash hack/lvm-qemu/run.sh

## Regenerates crds/ from the API types (a test fails when they drift).
crds:
	cargo run -q -- crds --out crds/

## tandem's main job on this machine (root): a local control plane, volumes on two simulated
## nodes, a GroupSnapshot, its proof, and a clean-up.
demo: deps tools
	cargo build --bin tandem --example demo
	target/debug/examples/demo

## The same story the way users run tandem (root): tandem's image built with no registry, a
## control plane and a real node (kubelet + containerd), helm install of the chart, PostgreSQL with
## pgbench in pods, a GroupSnapshot under load, and a clean-up.
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
demo-node: deps tools
	cargo build --bin tandem --example demo_node
	$(TARGET_DIR)/debug/examples/demo_node

.PHONY: chart-crds deploy

## Regenerates the chart's CRD templates from crds/ (a test fails when they drift).
chart-crds:
	hack/sync-chart-crds.sh

## Regenerates deploy/ from the chart with default values (a test fails when it drifts).
deploy: tools chart-crds
	hack/render-deploy.sh
