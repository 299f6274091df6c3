#!/usr/bin/env bash
# Builds the real control plane the tests run against, once, into a cache folder:
# etcd, kube-apiserver, kube-controller-manager and kubectl, and for the real-node tests
# kube-scheduler and kubelet, from their published Go modules (pinned by hack/tools/*/go.mod and
# go.sum). A second run with nothing changed takes seconds.
#
#   hack/test-tools.sh            build what is missing, print the bin folder
#
# Output: $TANDEM_TOOLS_DIR/bin (default ~/.cache/tandem/tools/bin); the tests look there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools_dir=${TANDEM_TOOLS_DIR:-$HOME/.cache/tandem/tools}
bin="$tools_dir/bin"
mkdir -p "$bin"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
export GOMODCACHE=${GOMODCACHE:-$tools_dir/gomod} GOCACHE=${GOCACHE:-$tools_dir/gocache}

log() { printf '[test-tools] %s\n' "$*" >&2; }

# build MODULE_DIR NAME PACKAGE [LDFLAGS]: rebuilds when the module's pins changed.
build() {
  local dir=$1 name=$2 pkg=$3 ldflags=${4:-}
  local stamp="$bin/.$name.stamp" want
  want=$( (cat "$here/tools/$dir/go.mod" "$here/tools/$dir/go.sum"; echo "$pkg $ldflags") | sha256sum | cut -d' ' -f1)
  if [[ -x "$bin/$name" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "$name is up to date"
    return
  fi
  log "building $name (first time: several minutes on 2 cores)..."
  local start=$SECONDS
  (cd "$here/tools/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.new" "$pkg")
  mv "$bin/$name.new" "$bin/$name"
  echo "$want" > "$stamp"
  log "built $name in $((SECONDS - start)) s"
}

kube_version=$(grep -oE 'k8s.io/kubernetes v[0-9.]+' "$here/tools/kube/go.mod" | head -n1 | cut -d' ' -f2)
[[ -n "$kube_version" ]] || { log "cannot read the k8s.io/kubernetes version from hack/tools/kube/go.mod"; exit 1; }
minor=$(echo "$kube_version" | cut -d. -f2)
version_flags="-X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$kube_version -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

build etcd etcd go.etcd.io/etcd/server/v3
build kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$version_flags"
build kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$version_flags"
build kube kubectl k8s.io/kubernetes/cmd/kubectl "$version_flags"
# The real node (tests/support/node.rs): same module, so most packages come from the cache above.
build kube kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$version_flags"
build kube kubelet k8s.io/kubernetes/cmd/kubelet "$version_flags"
build helm helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$(grep -oE 'helm.sh/helm/v3 v[0-9.]+' "$here/tools/helm/go.mod" | cut -d' ' -f2) -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$(grep -oE 'k8s.io/client-go v0\.[0-9]+' "$here/tools/helm/go.mod" | cut -d. -f3) -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$(grep -oE 'k8s.io/client-go v0\.[0-9]+' "$here/tools/helm/go.mod" | cut -d. -f3)"
echo "$bin"
