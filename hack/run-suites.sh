#!/usr/bin/env bash
# Runs every test of `make test` in two lanes at once, because most of a test's time is spent
# waiting on an API server, a kubelet or a QEMU guest, not on the CPU:
#   node lane   the LVM QEMU guests (hack/lvm-qemu/run.sh), then the RBD QEMU guest with the whole
#               product in it (tests/rbd_qemu.rs runs hack/rbd-qemu/run.sh against its API server)
#               and the test binaries that start real nodes (kubelet + containerd), one at a time:
#               they share the host's cgroups and loop devices, so they never overlap each other
#   api lane    every other test binary (each starts its own control plane), one at a time
# Each binary's output is kept in a log and printed whole when it ends, so lanes never interleave
# lines. A test binary whose tests fail runs those tests once more, alone: if they pass then, the
# suite counts as passed and the summary names them FLAKY (with the first run's log printed above),
# so a flake is seen and fixed, never hidden. Exits non-zero if anything failed twice, after printing
# each suite's time.
#
#   hack/run-suites.sh            everything
#   LVM_QEMU=0 hack/run-suites.sh without the LVM QEMU guests
#   RBD_QEMU=0 hack/run-suites.sh without the RBD QEMU guest
set -uo pipefail
cd "$(dirname "$0")/.."
# The real-node binaries (tests/support/node.rs users) go to the node lane.
NODE_SUITES=${NODE_SUITES:-"rbd_qemu real_node real_node_mariadb hooks exec_hold"}
logs=$(mktemp -d "${TMPDIR:-/tmp}/tandem-suites.XXXXXX")
trap 'rm -rf "$logs"' EXIT

# Build everything first (one cargo at a time), then list the test executables it built.
cargo test --lib --bins --tests --no-run || exit 1
mapfile -t built < <(cargo test --lib --bins --tests --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
         | "\(.target.kind[0]):\(.target.name) \(.executable)"' | sort)

node_lane=() api_lane=()
for entry in "${built[@]}"; do
  name=${entry%% *}
  if [[ " $NODE_SUITES " == *" ${name#*:} "* ]]; then node_lane+=("$entry"); else api_lane+=("$entry"); fi
done

# run_suite NAME COMMAND...: runs it with its output in a log, then prints the log and a status line.
# A libtest binary's failed tests get one more run (see the header).
run_suite() {
  local name=$1; shift
  local log="$logs/${name//[:\/]/_}.log" start=$SECONDS rc
  "$@" >"$log" 2>&1
  rc=$?
  local failed_tests=()
  if (( rc != 0 )) && [[ $name == *:* ]]; then
    mapfile -t failed_tests < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log")
    if (( ${#failed_tests[@]} > 0 )); then
      {
        echo "----- $name: ${#failed_tests[@]} failed test(s), run once more alone: ${failed_tests[*]}"
        "$@" --exact "${failed_tests[@]}"
      } >>"$log" 2>&1
      rc=$?
      if (( rc == 0 )); then
        printf '%s\n' "${failed_tests[@]/#/$name }" >>"$logs/flaky"
      fi
    fi
  fi
  {
    echo "===== $name ($((SECONDS - start)) s, exit $rc) ====="
    cat "$log"
  } | flock "$logs/.print" cat
  echo "$name $((SECONDS - start)) $rc" >>"$logs/summary"
  return $rc
}

run_lane() {
  local failed=0 entry
  for entry in "$@"; do
    if [[ $entry == lvm-qemu ]]; then
      run_suite lvm-qemu bash hack/lvm-qemu/run.sh || failed=1
    else
      run_suite "${entry%% *}" "${entry#* }" || failed=1
    fi
  done
  return $failed
}

start=$SECONDS
lvm=()
[[ ${LVM_QEMU:-1} == 1 ]] && lvm=(lvm-qemu)
# RBD_QEMU=0 reaches tests/rbd_qemu.rs, which then skips.
run_lane "${lvm[@]}" "${node_lane[@]}" &
node_pid=$!
run_lane "${api_lane[@]}" &
api_pid=$!
wait $node_pid; node_rc=$?
wait $api_pid; api_rc=$?

echo "===== suites (seconds, exit code) ====="
sort -k2 -n -r "$logs/summary" | awk '{printf "%-32s %5d s  exit %d\n", $1, $2, $3}'
echo "all suites: $((SECONDS - start)) s"
if [[ -s $logs/flaky ]]; then
  echo "FLAKY (failed, then passed when run again alone; fix them):"
  sed 's/^/  /' "$logs/flaky"
fi
if (( node_rc != 0 || api_rc != 0 )); then
  echo "FAILED:" && awk '$3 != 0 {print "  " $1}' "$logs/summary"
  exit 1
fi
