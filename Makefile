# tandem: the two things a fresh machine needs (see README.md), and their parts.
.PHONY: test demo deps tools lint unit lvm-qemu crds bench

## Everything CI runs: system packages, the test control plane, lint, every test.
test: deps tools lint unit lvm-qemu

deps:
	hack/install-test-deps.sh

tools:
	hack/test-tools.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

unit:
	cargo test --all-targets

lvm-qemu:
	@if [ -x hack/lvm-qemu/run.sh ]; then hack/lvm-qemu/run.sh; else echo "lvm-qemu: not present yet"; fi

## Regenerates crds/ from the API types (a test fails when they drift).
crds:
	cargo run -q -- crds --out crds/

demo:
	@echo "The demo arrives with the GroupSnapshot issue; until then, run: make test"

.PHONY: chart-crds deploy

## Regenerates the chart's CRD templates from crds/ (a test fails when they drift).
chart-crds:
	hack/sync-chart-crds.sh

## Regenerates deploy/ from the chart with default values (a test fails when it drifts).
deploy: tools chart-crds
	hack/render-deploy.sh
