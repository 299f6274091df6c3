# Runs INSIDE the QEMU guest (under dash) as the RBD test of tandem: a single-node Ceph on the
# guest's 127.0.0.1, three krbd images (ext4, XFS, ext4) in one RBD group, two "nodes" (two real
# agents, `tandem agent --oneshot-central-volume`, each with its own state dir) that freeze their
# mounts and hold, and the central cut between them (`tandem rbd group-snap`, in-process librbd).
# Prints "CHECK <name> PASS|FAIL <detail>", "PHASE <name> <ms>", one "BENCH ..." line and
# "GUEST-RESULT pass=N fail=M"; the host (run.sh) passes only if nothing failed.
# Under TCG every start of a Ceph C++ binary (rbd, cephcmd, ceph-*) costs about 1 s, so
# independent calls run in parallel (par) and the Ceph state that needs no daemon came from the host.
B=/ceph
export CEPH_CONF=$B/ceph.conf
PASS=0; FAIL=0
check() { # check NAME CONDITION-RC DETAIL
  if [ "$2" = 0 ]; then PASS=$((PASS+1)); echo "CHECK $1 PASS $3"; else FAIL=$((FAIL+1)); echo "CHECK $1 FAIL $3"; fi
}
now_ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
T_PHASE=$(now_ms)
phase() { _t=$(now_ms); echo "PHASE $1 $((_t-T_PHASE)) ms"; T_PHASE=$_t; }
step() { _t=$(now_ms); echo "    step $1 $((_t-T_STEP)) ms"; T_STEP=$_t; }
indent() { sed "s/^/    $1| /"; }
json_str() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" | head -1; }
json_num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" | head -1; }   # the integer part
# par FN ARG...: runs "FN ARG" for every ARG at once; fails if any failed. Waits for those jobs
# only (agents may be running in the background meanwhile).
par() {
  _fn=$1; shift; _pids=""
  for _a in "$@"; do ( "$_fn" "$_a"; echo $? >"/tmp/par.$_a" ) & _pids="$_pids $!"; done
  wait $_pids
  for _a in "$@"; do [ "$(cat "/tmp/par.$_a")" = 0 ] || return 1; done
}
# stop_if_failed WHAT: what follows cannot run after a failure so far (logs, result, exit).
stop_if_failed() {
  [ $FAIL = 0 ] && return 0
  echo "STOP: $1 failed; the rest depends on it"; touch /run/release-cut /run/release-excl
  for _f in /tmp/osd.err $B/log/mon.a.log $B/log/osd.0.log; do [ -s "$_f" ] && tail -15 "$_f" | indent "${_f##*/}"; done
  echo "GUEST-RESULT pass=$PASS fail=$FAIL"; exit 1
}
IMGS="a b c"
fs_of() { if [ "$1" = b ]; then echo xfs; else echo ext4; fi; }
dev_of() { cat "/tmp/dev.$1"; }
# unmap /dev/rbdN: the kernel's own interface (what `rbd device unmap -o noudev` writes), no
# process start. Without udev, `rbd device unmap` without -o noudev would wait forever.
unmap() { echo "${1#/dev/rbd}" >/sys/bus/rbd/remove_single_major; }

# tandem's RBD commands, with the connection they all take (the cephx secret in a key file).
trbd() { _sub=$1; shift; timeout 120 tandem rbd "$_sub" --mon-host 127.0.0.1:6789 --user admin --key-file $B/admin.key --pool rbd "$@"; }

# A write into a frozen filesystem sleeps, unkillable: probe in the background and watch it.
probe_start() { # probe_start MNT...
  PROBES=""
  for _m in "$@"; do ( echo probe >"$_m/probe" ) </dev/null >/dev/null 2>&1 & PROBES="$PROBES $!"; done
}
probes_blocked() { for _p in $PROBES; do kill -0 "$_p" 2>/dev/null || return 1; done; }
probes_done() { # probes_done SECONDS: every probe write finished within that time
  _i=0; while probes_blocked_any && [ $_i -lt $(($1*10)) ]; do sleep 0.1; _i=$((_i+1)); done
  probes_blocked_any && return 1; wait $PROBES; return 0
}
probes_blocked_any() { for _p in $PROBES; do kill -0 "$_p" 2>/dev/null && return 0; done; return 1; }
thawed() { probe_start /mnt/a /mnt/b /mnt/c; probes_done 5; }

# The two nodes: n1 holds /mnt/a and /mnt/b, n2 holds /mnt/c. Each agent freezes its mounts,
# prints a "phase":"Cut" status line once it holds, and thaws when /run/release-NAME appears,
# aborts when /run/abort-NAME appears (the cut failed: the controller's Abort), or thaws on its own
# freeze-timeout clock and exits at once.
HOLD_MS=60000
agent() { # agent NODE NAME FREEZE-TIMEOUT MNT...  (holds at most $HOLD_MS)
  _node=$1; _name=$2; _to=$3; shift 3; _vols=""
  for _m in "$@"; do _vols="$_vols --oneshot-central-volume $_m"; done
  tandem agent --node-name "$_node" --state-dir "/run/tandem-$_node" --oneshot-name "$_name" $_vols \
    --oneshot-hold-ms "$HOLD_MS" --oneshot-release-file "/run/release-$_name" \
    --oneshot-abort-file "/run/abort-$_name" \
    --oneshot-freeze-timeout-seconds "$_to" >"/tmp/$_name-$_node.out" 2>"/tmp/$_name-$_node.err" &
  eval "PID_$_node=\$!"
}
agents_start() { # agents_start NAME FREEZE-TIMEOUT
  T_AGENTS=$(now_ms); agent n1 "$1" "$2" /mnt/a /mnt/b; agent n2 "$1" "$2" /mnt/c
}
agents_hold() { # agents_hold NAME: both printed "phase":"Cut" (within 60 s), neither died
  _i=0
  while [ $_i -lt 600 ]; do
    grep -q '"phase":"Cut"' "/tmp/$1-n1.out" && grep -q '"phase":"Cut"' "/tmp/$1-n2.out" && { T_HOLD=$(now_ms); return 0; }
    kill -0 "$PID_n1" 2>/dev/null && kill -0 "$PID_n2" 2>/dev/null || break
    sleep 0.05; _i=$((_i+1))
  done
  for _n in n1 n2; do tail -3 "/tmp/$1-$_n.out" "/tmp/$1-$_n.err" | indent "$_n"; done; return 1
}
agents_exit() { # agents_exit NAME: waits for both; RC_n1 RC_n2 and their last status line
  wait "$PID_n1"; RC_n1=$?; wait "$PID_n2"; RC_n2=$?
  for _n in n1 n2; do
    echo "AGENT $1 $_n rc=$(eval echo \$RC_$_n) $(tail -1 "/tmp/$1-$_n.out" | cut -c1-600)"
    grep -iE 'error|warn' "/tmp/$1-$_n.err" | tail -3 | indent "$_n"
  done
}
final_phase() { tail -1 "/tmp/$1-$2.out" | json_str phase; }

echo "== guest: $(uname -r), $(nproc) cpu, $(awk '/MemTotal/{printf "%d MiB", $2/1024}' /proc/meminfo)"
T0=$(now_ms)

echo "== 1. bring-up: Ceph (mon + memstore OSD, pool rbd), krbd, three images, filesystems, data"
( modprobe -a rbd xfs; echo $? >/tmp/modprobe.rc ) &
MODPROBE=$!
T_STEP=$(now_ms)
ceph-mon -i a; check mon-start $? "ceph-mon on 127.0.0.1"
# Connect only once the mon listens on 6789 (0x1A85): a refused first try costs librados a 3 s hunt.
_i=0; while ! grep -q ':1A85 00000000:0000 0A' /proc/net/tcp && [ $_i -lt 300 ]; do sleep 0.1; _i=$((_i+1)); done
# The host made the keys, the mon store and the OSD dir; register the OSD and the size-1 pool.
cephcmd "{\"prefix\":\"osd new\",\"uuid\":\"$(cat $B/osd-uuid)\"}" \
  '{"prefix":"osd pool create","pool":"rbd","pg_num":8,"pgp_num":8}' \
  '{"prefix":"osd pool application enable","pool":"rbd","app":"rbd"}' >/tmp/cephcmd.out 2>&1
check mon-commands $? "osd new, osd pool create rbd (size 1 by default), application rbd: $(head -1 /tmp/cephcmd.out)"
step mon-start+commands
ceph-osd -i 0 2>/tmp/osd.err; check osd-start $? "ceph-osd (memstore)"; step osd-start
wait $MODPROBE; [ "$(cat /tmp/modprobe.rc)" = 0 ]; check modprobe $? "rbd, libceph, xfs"; step modprobe-wait
# rbd create waits until the OSD is up and the pool's PGs are active.
mkimg() { timeout 120 rbd create "rbd/$1" --size 512M; }
par mkimg $IMGS; check images $? "rbd create a b c (default Pacific features)"; step create
mapimg() { timeout 60 rbd device map -o noudev "rbd/$1" >"/tmp/dev.$1"; }   # no udev: -o noudev, always
par mapimg $IMGS; check map $? "krbd: $(for i in $IMGS; do printf '%s=%s ' $i "$(dev_of $i)"; done)"; step map
mkfs_img() {
  if [ "$(fs_of "$1")" = xfs ]; then mkfs.xfs -q -f "$(dev_of "$1")"; else mkfs.ext4 -q -F "$(dev_of "$1")"; fi
}
par mkfs_img $IMGS; check mkfs $? "ext4 on a and c, XFS on b"; step mkfs
for i in $IMGS; do
  mkdir -p "/mnt/$i" && mount -t "$(fs_of $i)" "$(dev_of $i)" "/mnt/$i" || check "mount-$i" 1 "mount $(dev_of $i)"
  dd if=/dev/urandom of="/mnt/$i/synced.bin" bs=1M count=4 2>/dev/null
done
sync
for i in $IMGS; do
  dd if=/dev/urandom of="/mnt/$i/dirty.bin" bs=1M count=4 2>/dev/null   # still dirty at freeze time
  echo "before $i" >"/mnt/$i/marker.txt"
  (cd "/mnt/$i" && sha256sum synced.bin dirty.bin marker.txt) >"/tmp/$i.sha"
done
stop_if_failed bring-up
phase bring-up

echo "== 2. the cut: both nodes hold their freeze, one group snapshot, release"
agents_start cut 60
agents_hold cut; check hold $? "both agents hold (phase Cut): n1 /mnt/a /mnt/b, n2 /mnt/c"
stop_if_failed "holding the freeze"
T_FROZEN=$T_HOLD
probe_start /mnt/a /mnt/b /mnt/c
out=$(trbd group-snap --group g1 --snap cut --image a --image b --image c 2>/tmp/gs.err); rc=$?
echo "GROUP-SNAP cut rc=$rc $out"; indent gs </tmp/gs.err | tail -5
# The writes started before the cut must still sleep after it (and for at least half a second).
while [ $(( $(now_ms) - T_FROZEN )) -lt 500 ]; do sleep 0.1; done
probes_blocked; check frozen-during-cut $? "a write into each of /mnt/a /mnt/b /mnt/c sleeps from before the cut until after it"
[ $rc = 0 ] && [ "$(echo "$out" | grep -o '"created":true')" ]; check group-snap $? "tandem rbd group-snap g1@cut created it"
GS_MS=$(echo "$out" | json_num groupSnapMillis); GS_CONNECT=$(echo "$out" | json_num connectMillis)
touch /run/release-cut
agents_exit cut
[ $RC_n1 = 0 ] && [ $RC_n2 = 0 ] && [ "$(final_phase cut n1)" = Released ] && [ "$(final_phase cut n2)" = Released ]
check released $? "both agents Released, exit 0"
probes_done 10; check thawed-after-release $? "the probe writes finished after the release"
for i in $IMGS; do echo "post-thaw $i" >"/mnt/$i/marker.txt"; touch "/mnt/$i/post-thaw"; done; sync
W1=$(tail -1 /tmp/cut-n1.out | json_num freezeWindowMillis)
W2=$(tail -1 /tmp/cut-n2.out | json_num freezeWindowMillis)
[ -n "$W1" ] && [ -n "$W2" ]; check windows $? "each agent reports its freeze window (n1 ${W1:-?} ms, n2 ${W2:-?} ms)"
# TCG is slow: every number here is several times what real hardware shows. On this host, without
# emulation, the same in-process group snapshot of 3 images took 49-91 ms (research: ceph-feasibility.md).
echo "BENCH window_ms=$(( ${W1:-0} > ${W2:-0} ? ${W1:-0} : ${W2:-0} )) window_n1_ms=${W1:-?} window_n2_ms=${W2:-?} group_snap_ms=${GS_MS:-?} connect_ms=${GS_CONNECT:-?} freeze_ms=$((T_HOLD-T_AGENTS)) (TCG; freeze_ms: agents started until both hold)"
phase cut

echo "== 3. verification: every member snapshot, mapped read-only"
# krbd maps a group snapshot's member by its name in the group namespace (.group.<...>), which
# `rbd snap ls --all` shows next to "group (rbd/g1@cut)".
mapsnap() {
  _s=$(rbd snap ls --all "rbd/$1" | awk '/@cut\)/ {print $2}')
  [ -n "$_s" ] && echo "$_s" >"/tmp/snapname.$1" && timeout 60 rbd device map -o noudev,ro "rbd/$1@$_s" >"/tmp/sdev.$1"
}
par mapsnap $IMGS; check map-snapshots $? "$(for i in $IMGS; do printf '%s@%s=%s ' $i "$(cat /tmp/snapname.$i 2>/dev/null)" "$(cat /tmp/sdev.$i 2>/dev/null)"; done)"
verify_tree() { # verify_tree DIR IMG WHAT
  (cd "$1" && sha256sum -c "/tmp/$2.sha" >/dev/null 2>&1); check "data-$3-$2" $? "pre-freeze data of $2 (synced, dirty, marker) in the $3"
  [ ! -e "$1/post-thaw" ] && [ ! -e "$1/probe" ]; check "no-post-thaw-$3-$2" $? "no write made after the freeze in the $3 of $2"
}
for i in $IMGS; do
  sdev=$(cat "/tmp/sdev.$i" 2>/dev/null); [ -b "$sdev" ] || continue
  mkdir -p "/mnt/s-$i"
  if [ "$(fs_of $i)" = xfs ]; then
    # A frozen XFS leaves its log dirty and a read-only device cannot replay it: norecovery.
    mount -t xfs -o ro,nouuid,norecovery "$sdev" "/mnt/s-$i"; check "mount-snap-$i" $? "XFS snapshot mounted ro,nouuid,norecovery"
  else
    e2fsck -fn "$sdev" >/tmp/fsck.out 2>&1; check "fsck-snap-$i" $? "e2fsck -fn of the ext4 snapshot"
    mount -t ext4 -o ro "$sdev" "/mnt/s-$i"; check "mount-snap-$i" $? "ext4 snapshot mounted ro"
  fi
  verify_tree "/mnt/s-$i" "$i" snapshot
  umount "/mnt/s-$i"
done
for i in $IMGS; do unmap "$(cat "/tmp/sdev.$i")"; done
[ "$(ls /sys/bus/rbd/devices | wc -l)" = 3 ]; check unmap-snapshots $? "snapshots unmapped"
phase verify

echo "== 4. idempotence, 5. an image of another group"
out=$(trbd group-snap --group g1 --snap cut --image a --image b --image c 2>/tmp/gs.err); rc=$?
echo "GROUP-SNAP cut again rc=$rc $out"
[ $rc = 0 ] && echo "$out" | grep -q '"created":false'; check repeat-not-created $? "the same group-snap again reports created:false"
other_setup() {
  case $1 in
    d) rbd create rbd/d --size 64M ;;
    other) rbd group create rbd/other ;;
  esac
}
par other_setup d other && rbd group image add rbd/other rbd/d; check other-setup $? "image d in group other (rbd CLI)"
out=$(trbd group-snap --group g1 --snap s5 --image a --image d 2>&1); rc=$?
echo "GROUP-SNAP s5 rc=$rc $(echo "$out" | tail -2)"
[ $rc != 0 ] && echo "$out" | grep -q other; check other-refused $? "an image in another group is refused, naming it"
lists() {
  case $1 in
    other) rbd group image list rbd/other >/tmp/list.other ;;
    snaps) rbd group snap ls rbd/g1 >/tmp/list.snaps ;;
  esac
}
par lists other snaps
indent other </tmp/list.other
[ "$(tr -d ' \t' </tmp/list.other)" = rbd/d ]; check other-kept $? "d is still in group other, alone"
indent snaps </tmp/list.snaps
[ "$(awk 'NR>1' /tmp/list.snaps | wc -l)" = 1 ] && awk 'NR>1 {print $1, $2}' /tmp/list.snaps | grep -qx "cut ok"
check one-snapshot $? "g1 has exactly one snapshot, cut (ok): not cut twice, nothing cut for s5"
phase idempotence-other-group

# Scenario 8 runs before 6 and 7: its remap maps a with -o exclusive, which 6 needs.
echo "== 8. rollback to g1@cut"
for i in $IMGS; do umount "/mnt/$i"; done
for i in $IMGS; do unmap "$(dev_of $i)"; done
[ -z "$(ls /sys/bus/rbd/devices)" ]; check unmap $? "members unmounted and unmapped"
out=$(trbd rollback --group g1 --snap cut 2>&1); rc=$?
echo "ROLLBACK rc=$rc $(echo "$out" | tail -1)"; check rollback $rc "tandem rbd rollback g1@cut"
# a is mapped -o exclusive from here on: krbd keeps its lock (scenario 6).
remap() { if [ "$1" = a ]; then _o=noudev,exclusive; else _o=noudev; fi; timeout 60 rbd device map -o $_o "rbd/$1" >"/tmp/dev.$1"; }
par remap $IMGS; check remap $? "mapped again (a with -o exclusive)"
for i in $IMGS; do
  d=$(dev_of $i)
  if [ "$(fs_of $i)" = xfs ]; then
    mount -t xfs "$d" "/mnt/$i" && umount "/mnt/$i"; check "log-replay-$i" $? "XFS log replayed by a read-write mount"
    xfs_repair -n "$d" >/tmp/fsck.out 2>&1; check "fsck-rollback-$i" $? "xfs_repair -n after the rollback"
  else
    e2fsck -fn "$d" >/tmp/fsck.out 2>&1; check "fsck-rollback-$i" $? "e2fsck -fn after the rollback"
  fi
  mount -t "$(fs_of $i)" "$d" "/mnt/$i"; check "mount-rollback-$i" $? "mounted"
  verify_tree "/mnt/$i" "$i" rollback
done
phase rollback

echo "== 6. a member mapped -o exclusive: the cut fails, the freezes end"
agents_start excl 60
agents_hold excl; check excl-hold $? "both agents hold"
t0=$(now_ms); out=$(trbd group-snap --group g1 --snap excl --image a --image b --image c 2>&1); rc=$?; t1=$(now_ms)
echo "GROUP-SNAP excl rc=$rc $((t1-t0)) ms $(echo "$out" | tail -2)"
# "Quickly": with EROFS, well before the agents' 60 s freeze timeout (the TCG guest is slow).
[ $rc != 0 ] && [ $((t1-t0)) -lt 45000 ] && echo "$out" | grep -qiE 'EROFS|read-only|\(30\)'
check excl-refused $? "group-snap fails with EROFS, in $((t1-t0)) ms"
touch /run/abort-excl
agents_exit excl
[ $RC_n1 != 0 ] && [ $RC_n2 != 0 ] && [ "$(final_phase excl n1)" = Aborted ] && [ "$(final_phase excl n2)" = Aborted ]
check excl-aborted $? "both agents abort (Aborted, exit non-zero), not Released"
thawed; check excl-thawed $? "nothing is left frozen"

echo "== 7. a cutter that dies between freeze and cut: each agent thaws on its own clock"
# Nobody cuts and nobody releases: the writes that sleep in the freeze must finish, and both
# agents end, on the agents' own freeze-timeout clock (5 s), long before their 60 s hold.
agents_start dead 5
agents_hold dead; check dead-hold $? "both agents hold (freeze timeout 5 s, hold 60 s), nobody cuts or releases"
probe_start /mnt/a /mnt/b /mnt/c
_i=0; while probes_blocked_any && [ $_i -lt 300 ]; do sleep 0.1; _i=$((_i+1)); done; t1=$(now_ms)
! probes_blocked_any && [ $((t1-T_HOLD)) -ge 1000 ]
check dead-self-thawed $? "the sleeping writes finished $((t1-T_HOLD)) ms after the hold began"
wait $PROBES
agents_exit dead; t2=$(now_ms)
[ $((t2-T_HOLD)) -lt 30000 ]; check dead-exited $? "both agents exited $((t2-T_HOLD)) ms after the hold began (hold 60 s)"
[ $RC_n1 != 0 ] && [ $RC_n2 != 0 ] && [ "$(final_phase dead n1)" = Aborted ] && [ "$(final_phase dead n2)" = Aborted ]
check dead-aborted $? "both agents report Aborted and exit non-zero"
thawed; check dead-thawed $? "nothing is left frozen"
# a's -o exclusive mapping would refuse the removal of its member snapshot (EROFS): unmap it first.
umount /mnt/a && unmap "$(dev_of a)"
out=$(trbd group-snap-rm --group g1 --snap cut 2>&1); rc=$?
echo "GROUP-SNAP-RM rc=$rc $(echo "$out" | tail -1)"
rbd group snap ls rbd/g1 >/tmp/list.snaps 2>&1; indent snaps </tmp/list.snaps
! awk '$1=="excl" && $2=="ok"' /tmp/list.snaps | grep -q .; check excl-no-snapshot $? "no complete g1@excl"
! awk '$1=="dead"' /tmp/list.snaps | grep -q .; check dead-no-snapshot $? "no g1@dead"
[ $rc = 0 ] && ! awk '{print $1}' /tmp/list.snaps | grep -qx cut; check group-snap-rm $? "tandem rbd group-snap-rm removed g1@cut"
phase exclusive-dead-cutter-rm

# 8. The whole product, when run.sh was given an API server (tests/rbd_qemu.rs): `tandem
# controller` and two `tandem agent`s (nodes n1, n2) reach the host's API server through
# serial-bridge on a virtio-serial port. The host made, in namespace /e2e/namespace, the
# ceph-csi-shaped PVs (handles e2e_handle), claims, VolumeAttachments, the config map, the Secret
# and the ConsistencyGroup g.
if [ -f /e2e/kubeconfig ]; then
echo "== 8. end to end: tandem controller and agents against the host's API server (virtio-serial)"
export KUBECONFIG=/e2e/kubeconfig
E2E_PORT=$(cat /e2e/port); E2E_NS=$(cat /e2e/namespace)
E2E_DEV=""
for _f in /sys/class/virtio-ports/*/name; do
  [ "$(cat "$_f" 2>/dev/null)" = tandem.api ] && E2E_DEV=/dev/$(basename "$(dirname "$_f")")
done
[ -c "$E2E_DEV" ]; check e2e-port $? "virtio-serial port tandem.api at ${E2E_DEV:-?}"
/e2e/serial-bridge guest "127.0.0.1:$E2E_PORT" "$E2E_DEV" 2>/tmp/bridge.err &
EIMGS="e1 e2 e3"
e2e_node() { if [ "$1" = e3 ]; then echo n2; else echo n1; fi; }
e2e_fs() { if [ "$1" = e2 ]; then echo xfs; else echo ext4; fi; }
e2e_handle() { echo "0001-0005-guest-0000000000000002-$1"; }
# Where ceph-csi stages a volume on its node: <kubelet>/plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount/<handle>.
e2e_mount() {
  _h=$(e2e_handle "$1")
  echo "/run/kubelet-$(e2e_node "$1")/plugins/kubernetes.io/csi/rbd.csi.ceph.com/$(printf %s "$_h" | sha256sum | cut -d' ' -f1)/globalmount/$_h"
}
e2e_up() { _e2e_up "$@" 2>"/tmp/e2e-up.$1.err" || { indent "$1" <"/tmp/e2e-up.$1.err"; return 1; }; }
_e2e_up() {
  # 512M: mkfs.xfs refuses filesystems under 300 MB.
  timeout 120 rbd create "rbd/$1" --size 512M && timeout 60 rbd device map -o noudev "rbd/$1" >"/tmp/dev.$1" || return 1
  if [ "$(e2e_fs "$1")" = xfs ]; then mkfs.xfs -q -f "$(dev_of "$1")"; else mkfs.ext4 -q -F "$(dev_of "$1")"; fi || return 1
  mkdir -p "$(e2e_mount "$1")" && mount -t "$(e2e_fs "$1")" "$(dev_of "$1")" "$(e2e_mount "$1")"
}
par e2e_up $EIMGS; check e2e-images $? "rbd create, krbd map, mkfs and mount e1 e2 e3 where ceph-csi stages them"
for i in $EIMGS; do
  _m=$(e2e_mount $i); dd if=/dev/urandom of="$_m/synced.bin" bs=1M count=2 2>/dev/null
done
sync
for i in $EIMGS; do
  _m=$(e2e_mount $i)
  dd if=/dev/urandom of="$_m/dirty.bin" bs=1M count=2 2>/dev/null   # still dirty at freeze time
  echo "before $i" >"$_m/marker.txt"
  (cd "$_m" && sha256sum synced.bin dirty.bin marker.txt) >"/tmp/$i.sha"
done
stop_if_failed "the end-to-end bring-up"
tandem controller --namespace "$E2E_NS" --ceph-csi-config "$E2E_NS/ceph-csi-config" >/tmp/controller.log 2>&1 &
E2E_CONTROLLER=$!
for n in n1 n2; do
  tandem agent --node-name $n --kubelet-dir /run/kubelet-$n --state-dir /run/tandem-e2e-$n \
    --restore-link-dir /run/links-$n >/tmp/agent-$n.log 2>&1 &
done
# kubectl tandem, as a user runs it: create, wait until Ready (TCG: several seconds per TLS start).
t0=$(now_ms)
timeout 300 tandem cli -n "$E2E_NS" snapshot create g s1 --wait --timeout 240s >/tmp/s1.out 2>&1; rc=$?; t1=$(now_ms)
indent s1 </tmp/s1.out | tail -4
[ $rc = 0 ] && grep -q 'Ready' /tmp/s1.out; check e2e-ready $? "kubectl tandem snapshot create g s1 --wait: Ready in $((t1-t0)) ms"
timeout 120 tandem cli -n "$E2E_NS" snapshot show s1 -o json >/tmp/s1.json 2>&1
# `-o json` is pretty-printed: one '"key": value' a line.
pjson() { sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\).*/\1/p" "$2" | head -1; }
E2E_SNAP=$(pjson snapshot /tmp/s1.json); E2E_GROUP=$(pjson group /tmp/s1.json)
E2E_CALL=$(pjson callMillis /tmp/s1.json)
# The overall window is the last freezeWindowMillis (each node's comes before it).
E2E_WINDOW=$(sed -n 's/^ *"freezeWindowMillis": \([0-9]*\).*/\1/p' /tmp/s1.json | tail -1)
grep -q '"phase": "Taken"' /tmp/s1.json && [ -n "$E2E_SNAP" ]
check e2e-central $? "status.central: rbd/$E2E_GROUP@$E2E_SNAP Taken, call ${E2E_CALL:-?} ms, freeze window ${E2E_WINDOW:-?} ms"
grep -q '"consistency": "FilesystemFrozen"' /tmp/s1.json; check e2e-consistency $? "consistency FilesystemFrozen"
for i in $EIMGS; do echo "post-thaw $i" >"$(e2e_mount $i)/marker.txt"; touch "$(e2e_mount $i)/post-thaw"; done; sync
e2e_mapsnap() {
  _s=$(rbd snap ls --all "rbd/$1" | awk -v g="@$E2E_SNAP)" 'index($0, g) {print $2}')
  [ -n "$_s" ] && timeout 60 rbd device map -o noudev,ro "rbd/$1@$_s" >"/tmp/sdev.$1"
}
par e2e_mapsnap $EIMGS; check e2e-map-snapshots $? "each member's snapshot of $E2E_SNAP mapped read-only"
for i in $EIMGS; do
  sdev=$(cat "/tmp/sdev.$i" 2>/dev/null); [ -b "$sdev" ] || continue
  mkdir -p "/mnt/s-$i"
  if [ "$(e2e_fs $i)" = xfs ]; then mount -t xfs -o ro,nouuid,norecovery "$sdev" "/mnt/s-$i"; else mount -t ext4 -o ro "$sdev" "/mnt/s-$i"; fi
  verify_tree "/mnt/s-$i" "$i" e2e-snapshot
  umount "/mnt/s-$i"; unmap "$sdev"
done
echo "BENCH e2e window_ms=${E2E_WINDOW:-?} group_snap_call_ms=${E2E_CALL:-?} apply_to_ready_ms=$((t1-t0)) (TCG, through the serial bridge)"
# Restore to new claims: the controller copies each member from rbd/$E2E_GROUP@$E2E_SNAP into a
# new image and publishes it as a static ceph-csi PV bound to a new claim; each copy, mapped
# read-only, holds exactly the pre-freeze data.
t0=$(now_ms)
timeout 400 tandem cli -n "$E2E_NS" restore create r1 --from-snapshot s1 --wait --timeout 360s >/tmp/r1.out 2>&1; rc=$?; t1=$(now_ms)
indent r1 </tmp/r1.out | tail -3
[ $rc = 0 ]; check e2e-restore-new-claims $? "kubectl tandem restore create r1 --from-snapshot s1 --wait: Completed in $((t1-t0)) ms"
timeout 120 tandem cli -n "$E2E_NS" restore show r1 -o json >/tmp/r1.json 2>&1
# Each member: its source claim (db-eN) and the restored PV, whose name is the new image's.
# (Keys come sorted: a member's persistentVolume comes before its sourceClaim.)
awk -F'"' '/"sourceClaim":/ {c=$4} /"persistentVolume": "tandem-/ {p=$4} c != "" && p != "" {print c, p; c=""; p=""}' /tmp/r1.json >/tmp/r1.members
indent members </tmp/r1.members
[ "$(wc -l </tmp/r1.members)" = 3 ]; check e2e-restored-members $? "three restored members"
while read -r claim pv; do
  i=${claim#db-}
  timeout 60 rbd device map -o noudev,ro "rbd/$pv" >"/tmp/rdev.$i" 2>&1 || { check "data-e2e-restored-$i" 1 "cannot map rbd/$pv"; continue; }
  rdev=$(cat "/tmp/rdev.$i"); mkdir -p "/mnt/r-$i"
  if [ "$(e2e_fs $i)" = xfs ]; then mount -t xfs -o ro,nouuid,norecovery "$rdev" "/mnt/r-$i"; else mount -t ext4 -o ro "$rdev" "/mnt/r-$i"; fi
  verify_tree "/mnt/r-$i" "$i" e2e-restored
  umount "/mnt/r-$i"; unmap "$rdev"
done </tmp/r1.members
# Restore in place: unmounted and unmapped as ceph-csi's NodeUnstage would; the host test plays
# the attach/detach controller (deletes the VolumeAttachments once r2 waits for them, and makes
# them again once r2 is Completed). Then one `rbd group snap rollback`, and the members, mapped
# and mounted again, hold the pre-freeze data.
for i in $EIMGS; do umount "$(e2e_mount $i)" && unmap "$(dev_of $i)"; done
t0=$(now_ms)
timeout 400 tandem cli -n "$E2E_NS" restore create r2 --from-snapshot s1 --in-place --wait --timeout 360s >/tmp/r2.out 2>&1; rc=$?; t1=$(now_ms)
indent r2 </tmp/r2.out | tail -3
[ $rc = 0 ]; check e2e-restore-in-place $? "kubectl tandem restore create r2 --from-snapshot s1 --in-place --wait: Completed in $((t1-t0)) ms"
e2e_remount() { timeout 60 rbd device map -o noudev "rbd/$1" >"/tmp/dev.$1" && mount -t "$(e2e_fs "$1")" "$(dev_of "$1")" "$(e2e_mount "$1")"; }
par e2e_remount $EIMGS; check e2e-remount $? "e1 e2 e3 mapped and mounted again where ceph-csi stages them"
for i in $EIMGS; do verify_tree "$(e2e_mount $i)" "$i" e2e-in-place; done
timeout 300 tandem cli -n "$E2E_NS" snapshot delete s1 --wait >/tmp/s1-del.out 2>&1; rc=$?
rbd group snap ls "rbd/$E2E_GROUP" >/tmp/e2e.snaps 2>&1
[ $rc = 0 ] && ! grep -q "$E2E_SNAP" /tmp/e2e.snaps; check e2e-deleted $? "deleting s1 removed rbd/$E2E_GROUP@$E2E_SNAP"
# An exclusive mapping makes the real cut fail: Failed, every node aborted, nothing frozen.
# (Its filesystem remounted on an exclusive mapping: a second, exclusive mapping beside the first
# would take the lock from it, and the first one's freeze fails with EIO instead.)
umount "$(e2e_mount e3)" && unmap "$(dev_of e3)" && timeout 60 rbd device map -o noudev,exclusive rbd/e3 >/tmp/dev.e3 2>&1 &&
  mount -t ext4 "$(dev_of e3)" "$(e2e_mount e3)"
check e2e-exclusive-map $? "e3 mapped -o exclusive ($(dev_of e3)) and mounted where ceph-csi stages it"
timeout 300 tandem cli -n "$E2E_NS" snapshot create g s2 --wait --timeout 240s >/tmp/s2.out 2>&1
timeout 120 tandem cli -n "$E2E_NS" snapshot show s2 -o json >/tmp/s2.json 2>&1
indent s2 </tmp/s2.out | tail -3
grep -q '"phase": "Failed"' /tmp/s2.json && grep -q 'exclusive lock' /tmp/s2.json
check e2e-exclusive-failed $? "s2 Failed, naming the exclusive lock"
probe_start $(for i in $EIMGS; do e2e_mount $i; done); probes_done 10
check e2e-nothing-frozen $? "every member takes writes after the failed cut"
rbd group snap ls "rbd/$E2E_GROUP" >/tmp/e2e.snaps 2>&1
[ -n "$E2E_GROUP" ] && ! grep -q tandem- /tmp/e2e.snaps; check e2e-nothing-cut $? "no group snapshot left in rbd/$E2E_GROUP"
# The controller killed while both nodes hold and before its cut: nothing claimed Ready, nothing
# cut, every filesystem thawed by its agent's own clock (the group's freezeTimeoutSeconds).
umount "$(e2e_mount e3)" && unmap "$(dev_of e3)" && timeout 60 rbd device map -o noudev rbd/e3 >/tmp/dev.e3 2>&1 &&
  mount -t ext4 "$(dev_of e3)" "$(e2e_mount e3)"
check e2e-remap $? "e3 mapped without -o exclusive again"
kill $E2E_CONTROLLER; wait $E2E_CONTROLLER 2>/dev/null
tandem controller --namespace "$E2E_NS" --ceph-csi-config "$E2E_NS/ceph-csi-config" \
  --test-only-release-delay-ms 600000 >/tmp/controller-held.log 2>&1 &
E2E_CONTROLLER=$!
timeout 120 tandem cli -n "$E2E_NS" snapshot create g s3 >/tmp/s3.out 2>&1
_i=0; while [ $_i -lt 120 ]; do
  [ "$(timeout 60 tandem cli -n "$E2E_NS" snapshot show s3 2>/dev/null | grep -c 'Cut/Cut')" = 2 ] && break
  sleep 0.5; _i=$((_i+1))
done
T_HELD=$(now_ms)
probe_start $(for i in $EIMGS; do e2e_mount $i; done)
sleep 1; probes_blocked; check e2e-held $? "both nodes hold s3 (Cut/Cut) and writes sleep"
kill -9 $E2E_CONTROLLER; wait $E2E_CONTROLLER 2>/dev/null
probes_done 60; check e2e-thawed-on-own-clock $? "the writes finished $(( $(now_ms) - T_HELD )) ms after the hold, with no controller (freezeTimeoutSeconds 20)"
tandem controller --namespace "$E2E_NS" --ceph-csi-config "$E2E_NS/ceph-csi-config" >/tmp/controller-after.log 2>&1 &
E2E_CONTROLLER=$!
_i=0; while [ $_i -lt 120 ]; do
  timeout 60 tandem cli -n "$E2E_NS" snapshot show s3 -o json >/tmp/s3.json 2>/dev/null
  grep -q '"phase": "Failed"' /tmp/s3.json && break
  sleep 1; _i=$((_i+1))
done
grep -q '"phase": "Failed"' /tmp/s3.json && ! grep -q '"phase": "Taken"' /tmp/s3.json
check e2e-killed-failed $? "s3 Failed once a controller was back: $(pjson message /tmp/s3.json | cut -c1-200)"
rbd group snap ls "rbd/$E2E_GROUP" >/tmp/e2e.snaps 2>&1
[ -n "$E2E_GROUP" ] && ! grep -q tandem- /tmp/e2e.snaps; check e2e-killed-nothing-cut $? "no group snapshot in rbd/$E2E_GROUP"
kill $E2E_CONTROLLER 2>/dev/null
grep -E 'ERROR|WARN' /tmp/controller.log | tail -5 | indent controller
for n in n1 n2; do grep -E 'ERROR|WARN' /tmp/agent-$n.log | tail -3 | indent "agent-$n"; done
[ -s /tmp/bridge.err ] && indent bridge </tmp/bridge.err | tail -3
phase end-to-end
fi
echo "PHASE guest-test-total $(( $(now_ms) - T0 )) ms"
echo "GUEST-RESULT pass=$PASS fail=$FAIL"
[ $FAIL = 0 ]
