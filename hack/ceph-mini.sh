#!/usr/bin/env bash
# A throw-away single-node Ceph for tests: one mon and one memstore OSD on 127.0.0.1, cephx on,
# no mgr (RBD images, groups and group snapshots need none), a size-1 pool `rbd` ready for RBD.
# Everything lives under the directory given; nothing is started through systemd.
#
#   hack/ceph-mini.sh up DIR MON_PORT OSD_PORT_MIN OSD_PORT_MAX
#   hack/ceph-mini.sh down DIR
#
# The caller picks the ports (the OSD takes 4 of its range), so two clusters never collide.
# `up` prints what a client needs on stdout, one KEY=value a line (progress goes to stderr):
#   CEPH_MON_HOST CEPH_FSID CEPH_POOL CEPH_CONF
#   CEPH_USER / CEPH_KEY / CEPH_KEYRING   client.tandem, with the caps ceph-csi's users have (profile rbd)
#   CEPH_ADMIN_KEY                          client.admin
# `down` stops only the daemons started for DIR (by their pid files) and removes DIR.
# Needs: ceph-mon ceph-osd ceph-common (hack/install-test-deps.sh).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || { echo "usage: $0 up DIR MON_PORT OSD_PORT_MIN OSD_PORT_MAX | down DIR" >&2; exit 2; }
dir=$(realpath -m "$dir")
conf=$dir/ceph.conf
marker="# written by tandem hack/ceph-mini.sh"

say() { echo "[ceph-mini] $*" >&2; }
# The CLI with our conf and a bounded wait for the mon.
ceph_() { ceph -c "$conf" --connect-timeout 10 "$@"; }
# wait_until SECONDS WHAT CMD...: retries CMD every 0.1 s.
wait_until() {
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { say "timed out waiting for $what"; return 1; }
    sleep 0.1
  done
}

# A pid is stopped when it is gone or a zombie: the daemons are re-parented to PID 1, which may
# reap them late, and `kill -0` succeeds on a zombie.
alive() {
  local state
  state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z ]]
}

# stop PIDFILE...: SIGTERM to each daemon of THIS cluster (its command line names our conf, so a
# reused pid is never hit), then wait up to 5 s each, SIGKILL if need be.
stop() {
  local f pid pids=()
  for f in "$@"; do
    [[ -e $f ]] || continue
    pid=$(<"$f")
    if alive "$pid" && [[ $(tr '\0' ' ' <"/proc/$pid/cmdline") == ceph-*" -c $conf "* ]]; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then say "pid $pid ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
}

down() {
  [[ -d $dir ]] || return 0
  # Only a directory this script set up is removed.
  if [[ -e $conf ]] && ! grep -qxF "$marker" "$conf"; then
    say "$conf was not written by this script; leaving $dir alone"
    return 1
  fi
  # The OSD first (it can still tell the mon it is going), then the mon.
  stop "$dir"/run/osd.*.pid
  stop "$dir"/run/mon.*.pid
  rm -rf "$dir"
}

write_conf() {
  cat >"$conf" <<EOF
$marker
[global]
fsid = $1
mon_host = [v2:127.0.0.1:$mon_port]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
# msgr2 only: half the OSD's ports; librados 14+ speaks it.
ms_bind_msgr1 = false
ms_bind_port_min = $osd_port_min
ms_bind_port_max = $osd_port_max
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $dir/\$cluster.\$name.keyring
# One OSD: pools of size 1, no health warning about it or about a fullish disk.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
run_dir = $dir/run
admin_socket = $dir/run/\$cluster-\$name.asok
pid_file = $dir/run/\$name.pid
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/\$cluster.log
crash_dir = $dir/crash

[mon]
mon_data = $dir/mon/\$cluster-\$id
keyring = $dir/mon/\$cluster-\$id/keyring
mon_initial_members = a
# Each group snapshot create/remove allocates or frees a pool snap id, a mon proposal; the default
# 1 s between proposals makes each take about a second, and bring-up about 8 s.
paxos_propose_interval = 0.05
# With no mgr the mon reports MGR_DOWN after this grace (default 2 minutes).
mon_mgr_mkfs_grace = 31536000

[osd]
osd_data = $dir/osd/\$cluster-\$id
# Data in the OSD's RAM, capped here: tests write little.
osd_objectstore = memstore
memstore_device_bytes = 536870912
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
EOF
}

up() {
  mon_port=${3:?MON_PORT}
  osd_port_min=${4:?OSD_PORT_MIN}
  osd_port_max=${5:?OSD_PORT_MAX}
  command -v ceph-mon >/dev/null || { say "ceph-mon is not installed: run hack/install-test-deps.sh"; return 1; }
  [[ ! -e $conf ]] || { say "$dir already holds a cluster; run '$0 down $dir' first"; return 1; }
  # A failed bring-up shows the daemons' logs and leaves nothing running.
  trap 'rc=$?; if ((rc)); then tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 2>/dev/null || true; down || true; fi' EXIT
  mkdir -p "$dir"/{run,log,mon/ceph-a,crash}
  local fsid; fsid=$(</proc/sys/kernel/random/uuid)
  write_conf "$fsid"

  # Keys: the mon's, client.admin's (imported into the mon's keyring so it exists from the start).
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
    >>"$dir/log/mon-mkfs.out" 2>&1
  # The daemons fork away; their stdio goes to files so a caller reading our output is not held.
  ceph-mon -c "$conf" -i a </dev/null >>"$dir/log/mon.out" 2>&1
  wait_until 30 "the mon's quorum" ceph_ quorum_status
  say "mon.a up on 127.0.0.1:$mon_port"

  # One OSD, keyed through `osd new` (which also creates its auth entry).
  local uuid secret id
  uuid=$(</proc/sys/kernel/random/uuid)
  secret=$(ceph-authtool --gen-print-key)
  id=$(echo "{\"cephx_secret\": \"$secret\"}" | ceph_ osd new "$uuid" -i -)
  mkdir -p "$dir/osd/ceph-$id"
  ceph-authtool --create-keyring "$dir/osd/ceph-$id/keyring" --name "osd.$id" --add-key "$secret" >/dev/null
  ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" --keyring "$dir/osd/ceph-$id/keyring" \
    </dev/null >>"$dir/log/osd-mkfs.out" 2>&1
  ceph-osd -c "$conf" -i "$id" --keyring "$dir/osd/ceph-$id/keyring" </dev/null >>"$dir/log/osd.out" 2>&1
  wait_until 60 "osd.$id up" bash -c "ceph -c '$conf' --connect-timeout 10 osd stat -f json | grep -q '\"num_up_osds\":1'"
  say "osd.$id up"

  ceph_ osd pool create rbd 8 8 >/dev/null 2>&1
  rbd -c "$conf" pool init rbd
  # The client tests run as: what ceph-csi documents for its users.
  ceph_ auth get-or-create client.tandem mon 'profile rbd' osd 'profile rbd pool=rbd' \
    -o "$dir/ceph.client.tandem.keyring" >/dev/null 2>&1
  # The first I/O as that user doubles as "the PGs are active".
  wait_until 60 "pool rbd usable" rbd -c "$conf" --id tandem --keyring "$dir/ceph.client.tandem.keyring" -p rbd ls
  say "pool rbd ready"

  echo "CEPH_MON_HOST=[v2:127.0.0.1:$mon_port]"
  echo "CEPH_FSID=$fsid"
  echo "CEPH_POOL=rbd"
  echo "CEPH_CONF=$conf"
  echo "CEPH_USER=tandem"
  echo "CEPH_KEY=$(ceph-authtool -p -n client.tandem "$dir/ceph.client.tandem.keyring")"
  echo "CEPH_KEYRING=$dir/ceph.client.tandem.keyring"
  echo "CEPH_ADMIN_KEY=$(ceph-authtool -p -n client.admin "$dir/ceph.client.admin.keyring")"
}

case $cmd in
  up) up "$@" ;;
  down) down ;;
  *) echo "usage: $0 up DIR MON_PORT OSD_PORT_MIN OSD_PORT_MAX | down DIR" >&2; exit 2 ;;
esac
