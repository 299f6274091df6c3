# Runs INSIDE the QEMU guest (under dash) as the LVM test of the tandem agent.
# Makes a VG with a thin pool (thin ext4 + thin xfs volumes) and a thick ext4 volume, lets the real
# agent (`tandem agent --oneshot-volume ...`: discovery, syncfs, parallel FIFREEZE, lvm-thin /
# lvm-thick backends, journal, watchdog) cut them, and checks the snapshots; then restores clones of
# member snapshots (`--oneshot-action restore|attach|unrestore`) and checks them.
# Prints "CHECK <name> PASS|FAIL <detail>", "OUTCOME <name> <what happened>" and
# "GUEST-RESULT pass=N fail=M"; the host (run.sh) decides what each kernel must show.
PASS=0; FAIL=0
check() { # check NAME CONDITION-RC DETAIL
  if [ "$2" = 0 ]; then PASS=$((PASS+1)); echo "CHECK $1 PASS $3"; else FAIL=$((FAIL+1)); echo "CHECK $1 FAIL $3"; fi
}
now_ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
agent() { tandem agent --node-name guest --state-dir /run/tandem-state "$@"; }
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" | head -1; }

echo "== guest: $(uname -r), $(nproc) cpu"
modprobe -a virtio_pci virtio_blk dm_mod dm_thin_pool dm_snapshot xfs || echo "modprobe failed"
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
pvcreate -q /dev/vda && vgcreate -q vg0 /dev/vda && lvcreate -q --type thin-pool -L 1200M -n pool vg0
check setup $? "vg0 with a thin pool"
mkvol() { # mkvol NAME FS KIND
  if [ "$3" = thin ]; then lvcreate -q -V 1G -T vg0/pool -n "$1"; else lvcreate -q -L 256M -n "$1" vg0; fi
  if [ "$2" = xfs ]; then mkfs.xfs -q -f "/dev/vg0/$1"; else mkfs.ext4 -q -F "/dev/vg0/$1"; fi
  mkdir -p "/mnt/$1" && mount "/dev/vg0/$1" "/mnt/$1"
  dd if=/dev/urandom of="/mnt/$1/synced.bin" bs=1M count=16 2>/dev/null; sync
  dd if=/dev/urandom of="/mnt/$1/dirty.bin" bs=1M count=16 2>/dev/null   # dirty at freeze time
  echo "before $1" > "/mnt/$1/marker.txt"
  (cd "/mnt/$1" && sha256sum synced.bin dirty.bin marker.txt) > "/tmp/$1.sha"
}
mkvol vol1 ext4 thin; mkvol vol2 xfs thin; mkvol thick1 ext4 thick

verify() { # verify SNAPSHOT-LV FS ORIGIN
  # Thin snapshots are made with the activation-skip flag: activate explicitly. Thick ones are active.
  case $1 in *thick*) ;; *) lvchange -q -ay -K "vg0/$1" </dev/null ;; esac
  mkdir -p "/mnt/s-$1"
  if [ "$2" = xfs ]; then
    mount -t xfs -o nouuid "/dev/vg0/$1" "/mnt/s-$1" && umount "/mnt/s-$1"   # replay the log
    xfs_repair -n "/dev/vg0/$1" >/tmp/fsck.out 2>&1; check "fsck-$1" $? "xfs_repair -n"
    mount -t xfs -o ro,nouuid "/dev/vg0/$1" "/mnt/s-$1"
  else
    e2fsck -fn "/dev/vg0/$1" >/tmp/fsck.out 2>&1; check "fsck-$1" $? "e2fsck -fn"
    mount -t ext4 -o ro "/dev/vg0/$1" "/mnt/s-$1"
  fi
  (cd "/mnt/s-$1" && sha256sum -c "/tmp/$3.sha" >/dev/null 2>&1); check "data-$1" $? "pre-freeze data (synced, dirty, marker)"
  [ ! -e "/mnt/s-$1/post-thaw" ]; check "no-post-thaw-$1" $? "post-thaw write absent"
  umount "/mnt/s-$1"
}
# A write that sleeps in the freeze cannot be killed (not even by timeout): probe in the background.
frozen_probe() { # prints "ok" when a write into /mnt/$1 completes within 3 s, else "frozen"
  ( echo probe > "/mnt/$1/probe" ) >/dev/null 2>&1 </dev/null &
  p=$!; i=0
  while kill -0 $p 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
  if kill -0 $p 2>/dev/null; then echo frozen; else wait $p; echo ok; fi
}
snaps() { lvs --noheadings -o lv_name vg0 2>/dev/null | grep -c tandem; }
# The snapshot name tandem cuts: tandem.<namespace>.<name>.<pv>.<8 hex of sha256(owner)>, where the
# owner (the cut's key) of a one-shot cut is oneshot-<namespace>-<name>.
snap_name() { # snap_name NAMESPACE NAME PV
  echo "tandem.$1.$2.$3.$(printf %s "oneshot-$1-$2" | sha256sum | cut -c1-8)"
}
has_owner_tag() { # has_owner_tag LV NAMESPACE NAME
  lvs --noheadings -o lv_tags "vg0/$1" 2>/dev/null | tr ',' '\n' | tr -d ' ' | grep -qx "tandem-owner-oneshot-$2-$3"
}

echo "== thin, freeze Required"
t0=$(now_ms); out=$(agent --oneshot-volume /mnt/vol1 --oneshot-volume /mnt/vol2 --oneshot-name thin 2>/tmp/agent.err); rc=$?; t1=$(now_ms)
echo "AGENT thin rc=$rc wall_ms=$((t1-t0)) $out"; sed 's/^/    | /' /tmp/agent.err | tail -5
phase=$(echo "$out" | json_field phase)
for v in vol1 vol2; do echo "post-thaw" > /mnt/$v/marker.txt; touch /mnt/$v/post-thaw; done; sync
THIN_HOLDS=no
if [ "$phase" = Released ]; then
  THIN_HOLDS=yes
  echo "OUTCOME thin-required Released window_ms=$(echo "$out" | sed -n 's/.*"freezeWindowMillis":\([0-9]*\).*/\1/p')"
  echo "$out" | grep -q '"backend":"lvm-thin"'; check thin-backend $? "backend lvm-thin"
  [ "$(echo "$out" | grep -o '"frozen":true' | wc -l)" = 2 ]; check thin-frozen $? "both volumes frozen during the cut"
  verify "$(snap_name local thin vol1)" ext4 vol1
  verify "$(snap_name local thin vol2)" xfs vol2
  has_owner_tag "$(snap_name local thin vol1)" local thin; check thin-owner-tag $? "tagged tandem-owner-<its cut>"
  agent --oneshot-action delete --oneshot-name thin >/dev/null; check thin-delete $? "delete"
  [ "$(snaps)" = 0 ]; check thin-deleted $? "snapshots removed"
elif echo "$out" | grep -q "refused to snapshot"; then
  echo "OUTCOME thin-required FrozenOriginBusy"
  [ "$phase" = Failed ]; check thin-failed-honestly $? "phase Failed, no consistency claimed"
  [ "$(snaps)" = 0 ]; check thin-no-leftover $? "no snapshot left behind"
  [ "$(frozen_probe vol1)" = ok ] && [ "$(frozen_probe vol2)" = ok ]; check thin-thawed $? "volumes thawed"
  echo "== thin, freeze BestEffort (degrade: LVM's own suspend, reported unfrozen)"
  out=$(agent --oneshot-volume /mnt/vol1 --oneshot-name thin-be --oneshot-freeze BestEffort 2>/tmp/agent.err); rc=$?
  echo "AGENT thin-be rc=$rc $out"
  [ "$(echo "$out" | json_field phase)" = Released ]; check thin-be-released $? "Released"
  echo "$out" | grep -q '"frozen":false'; check thin-be-unfrozen $? "reported frozen=false"
  echo "$out" | grep -q 'consistent on its own only'; check thin-be-reason $? "reason says consistent on its own only"
  agent --oneshot-action delete --oneshot-name thin-be >/dev/null; check thin-be-delete $? "delete"
else
  echo "OUTCOME thin-required other"; check thin-outcome 1 "unexpected: $out"
fi

echo "== thick, freeze Required"
out=$(agent --oneshot-volume /mnt/thick1 --oneshot-name thick --thick-cow-size 64M 2>/tmp/agent.err); rc=$?
echo "AGENT thick rc=$rc $out"; sed 's/^/    | /' /tmp/agent.err | tail -5
phase=$(echo "$out" | json_field phase)
echo "post-thaw" > /mnt/thick1/marker.txt; touch /mnt/thick1/post-thaw; sync
if [ "$phase" = Released ]; then
  echo "OUTCOME thick-required Released"
  echo "$out" | grep -q '"backend":"lvm-thick"'; check thick-backend $? "backend lvm-thick"
  verify "$(snap_name local thick thick1)" ext4 thick1
  has_owner_tag "$(snap_name local thick thick1)" local thick; check thick-owner-tag $? "tagged tandem-owner-<its cut>"
  agent --oneshot-action delete --oneshot-name thick >/dev/null; check thick-delete $? "delete"
  [ "$(snaps)" = 0 ]; check thick-deleted $? "snapshot removed"
elif echo "$out" | grep -q "refused to snapshot"; then
  echo "OUTCOME thick-required FrozenOriginBusy"
  [ "$phase" = Failed ]; check thick-failed-honestly $? "phase Failed"
  [ "$(snaps)" = 0 ]; check thick-no-leftover $? "the half-made thick snapshot was removed"
  [ "$(frozen_probe thick1)" = ok ]; check thick-thawed $? "volume thawed"
else
  echo "OUTCOME thick-required other"; check thick-outcome 1 "unexpected: $out"
fi

echo "== journal: an agent killed while holding the freeze is thawed by the next start"
if [ "$THIN_HOLDS" = yes ]; then
  # Not through the agent function: $! must be tandem itself, not a subshell, for the kill below.
  tandem agent --node-name guest --state-dir /run/tandem-state --oneshot-volume /mnt/vol1 --oneshot-name held --oneshot-hold-ms 120000 --oneshot-freeze-timeout-seconds 300 >/tmp/held.out 2>&1 &
  apid=$!
  # Wait (bounded) until the agent has cut the snapshot (journaled Freezing: it holds the freeze).
  held_lv=vg0/$(snap_name local held vol1)
  i=0; while ! lvs "$held_lv" >/dev/null 2>&1 && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
  lvs "$held_lv" >/dev/null 2>&1 && grep -q '"stage": "Freezing"' /run/tandem-state/journal/oneshot-local-held.json 2>/dev/null
  check held-cut $? "the agent cut and holds the freeze (snapshot made, journal stage Freezing)"
  lvs --noheadings -o lv_name vg0 | sed 's/^/    lv: /'
  sed 's/^/    agent: /' /tmp/held.out | tail -5
  kill -9 $apid; wait $apid 2>/dev/null
  [ "$(frozen_probe vol1)" = frozen ]; check killed-left-frozen $? "the killed agent left vol1 frozen"
  agent --recover-only >/dev/null 2>&1; check recover-run $? "tandem agent --recover-only"
  sleep 1; [ "$(frozen_probe vol1)" = ok ]; check recover-thawed $? "vol1 writable after the restart"
  [ "$(lvs --noheadings -o lv_name vg0 | grep -c tandem.local.held)" = 0 ]; check recover-no-leak $? "the void snapshot was deleted"
else
  echo "    skipped: this kernel cannot hold a freeze across an LVM snapshot"
fi

echo "== identity: an LV planted at a cut's name is neither adopted nor deleted"
planted=$(snap_name local plant vol1)
lvcreate -q -V 64M -T vg0/pool -n "$planted" >/dev/null; check plant-setup $? "planted an untagged thin LV $planted"
out=$(agent --oneshot-volume /mnt/vol1 --oneshot-name plant --oneshot-freeze Disabled 2>/tmp/agent.err)
echo "AGENT plant $out"
[ "$(echo "$out" | json_field phase)" = Failed ]; check plant-failed $? "the cut failed (not Released with the planted LV)"
echo "$out" | grep -q "already exists"; check plant-reason $? "it says the LV already exists"
agent --oneshot-action delete --oneshot-name plant >/dev/null 2>&1
lvs "vg0/$planted" >/dev/null 2>&1; check plant-kept $? "the planted LV survived the cut and its delete"
lvremove -q -f "vg0/$planted" >/dev/null 2>&1

echo "== L2: a long realistic name fits a device-mapper name (thick: <vg>-<lv>-cow < 128 bytes)"
long_pv=pvc-3f9a8b7c-1d2e-4f5a-8b9c-0d1e2f3a4b5c
lvcreate -q -L 128M -n long1 vg0 >/dev/null && mkfs.ext4 -q -F /dev/vg0/long1 && mkdir -p "/mnt/$long_pv" && mount /dev/vg0/long1 "/mnt/$long_pv"
check long-setup $? "thick LV mounted at /mnt/$long_pv"
out=$(agent --oneshot-volume "/mnt/$long_pv" --oneshot-namespace team-payments-prod-eu-west-1 --oneshot-name orders-db-nightly-2026-11-21-0300 --oneshot-freeze Disabled --thick-cow-size 32M 2>/tmp/agent.err)
echo "AGENT long $out"; sed 's/^/    | /' /tmp/agent.err | tail -3
[ "$(echo "$out" | json_field phase)" = Released ]; check long-released $? "Released"
lv=$(echo "$out" | sed -n 's/.*"snapshotHandle":"lvm:vg0\/\([^"]*\)".*/\1/p')
echo "    snapshot LV: $lv (${#lv} bytes)"
longest=$(dmsetup ls | awk '{print length($1)}' | sort -n | tail -1)
[ -n "$lv" ] && [ "$longest" -lt 128 ]; check long-dm-name $? "longest dm name $longest bytes"
lvs --noheadings -o lv_attr "vg0/$lv" | grep -q '^ *s...a'; check long-active $? "the thick snapshot is active"
agent --oneshot-action delete --oneshot-namespace team-payments-prod-eu-west-1 --oneshot-name orders-db-nightly-2026-11-21-0300 >/dev/null; check long-delete $? "delete"
[ "$(snaps)" = 0 ]; check long-deleted $? "snapshot removed"
umount "/mnt/$long_pv"

echo "== L3: what lvs reports for an overflowed thick snapshot (read by lvm::parse_health)"
lvcreate -q -s -L 8M -n overflow vg0/long1 >/dev/null 2>&1
dd if=/dev/urandom of=/dev/vg0/long1 bs=1M count=24 conv=fsync 2>/dev/null; sync
line=$(lvs --noheadings --separator '|' -o lv_attr,snap_percent vg0/overflow 2>/dev/null)
echo "LVS-OVERFLOW $line"
echo "$line" | grep -q '^ *s...I'; check l3-invalid-attr $? "lv_attr state I (invalid snapshot)"
lvremove -q -f vg0/overflow >/dev/null 2>&1

echo "== L11: a second disk carrying a fake vg0 (a tenant's raw block PV) is invisible to the agent"
# Written the way a tenant would: LVM on that disk alone, an LV named like a real one, never active.
on_fake() { "$@" --devices /dev/vdb; }
on_real() { "$@" --devices /dev/vda; }
# A thin snapshot cut before the fake appears (inactive: its delete finds the VG by name).
out=$(agent --oneshot-volume /mnt/vol1 --oneshot-name predup --oneshot-freeze Disabled 2>/tmp/agent.err)
[ "$(echo "$out" | json_field phase)" = Released ]; check fake-precut $? "a cut before the fake vg0 appears"
# vgcreate refuses a name that exists under /dev: hide the real vg0's node directory meanwhile.
mv /dev/vg0 /dev/vg0.hidden
on_fake pvcreate -q /dev/vdb >/dev/null && on_fake vgcreate -q vg0 /dev/vdb >/dev/null \
  && on_fake lvcreate -q -an -Zn -L 8M -n thick1 vg0 >/dev/null 2>&1
rc=$?; mv /dev/vg0.hidden /dev/vg0; [ $rc = 0 ]
check fake-setup $? "fake vg0 with an LV thick1 on /dev/vdb"
lvs vg0/thick1 >/tmp/lvs.out 2>&1; rc=$?; sed 's/^/    plain lvs: /' /tmp/lvs.out | head -3
[ $rc != 0 ]; check fake-effective $? "a plain lvs vg0/thick1 now refuses (duplicate VG names)"
out=$(agent --oneshot-volume /mnt/thick1 --oneshot-volume /mnt/vol1 --oneshot-name dup --oneshot-freeze Disabled --thick-cow-size 32M 2>/tmp/agent.err)
echo "AGENT dup $out"; sed 's/^/    | /' /tmp/agent.err | tail -3
[ "$(echo "$out" | json_field phase)" = Released ]; check fake-cut-released $? "the cut of the real vg0 is Released"
for o in thick1 vol1; do
  origin=$(on_real lvs --noheadings -o origin "vg0/$(snap_name local dup $o)" 2>/dev/null | tr -d ' ')
  [ "$origin" = "$o" ]; check "fake-snapshot-$o" $? "the real vg0 has the snapshot of $o (origin: ${origin:-none})"
done
[ "$(on_fake lvs --noheadings -o lv_name vg0 2>/dev/null | tr -d ' ')" = thick1 ]; check fake-untouched $? "the fake vg0 still holds only its thick1"
agent --oneshot-action delete --oneshot-name dup >/tmp/del.out 2>&1; rc=$?; tail -2 /tmp/del.out | sed 's/^/    | /'
check fake-delete $rc "delete"
[ "$(on_real lvs --noheadings -o lv_name vg0 2>/dev/null | grep -c tandem.local.dup)" = 0 ]; check fake-deleted $? "the snapshots are gone from the real vg0"
agent --oneshot-action delete --oneshot-name predup >/tmp/del.out 2>&1; rc=$?; tail -2 /tmp/del.out | sed 's/^/    | /'
[ $rc = 0 ] && ! on_real lvs "vg0/$(snap_name local predup vol1)" >/dev/null 2>&1
check fake-predelete $? "the snapshot cut before the fake is deleted while it is there"
[ "$(on_real lvs --noheadings -o lv_name vg0 2>/dev/null | tr -d ' ' | grep -cxE 'pool|vol1|vol2|thick1|long1')" = 5 ]; check fake-real-kept $? "the real vg0's volumes are all there"
[ "$(on_fake lvs --noheadings -o lv_name vg0 2>/dev/null | tr -d ' ')" = thick1 ]; check fake-kept $? "the fake vg0 and its LV survived the delete"
dd if=/dev/zero of=/dev/vdb bs=1M count=2 conv=fsync 2>/dev/null   # the fake is gone again

echo "== L11: a PV of vg0 that no active LV uses is admitted by its PV uuid"
vgextend -q vg0 /dev/vdb >/dev/null; check unused-pv-setup $? "vgextend vg0 /dev/vdb (no LV on it)"
out=$(agent --oneshot-volume /mnt/thick1 --oneshot-volume /mnt/vol1 --oneshot-name unused --oneshot-freeze Disabled --thick-cow-size 32M 2>/tmp/agent.err)
echo "AGENT unused $out" | cut -c1-400; grep -i "admitting" /tmp/agent.err | sed 's/^/    | /' | head -2
grep -q "admitting physical volumes" /tmp/agent.err; check unused-pv-admitted $? "the agent admitted /dev/vdb by its PV uuid"
[ "$(echo "$out" | json_field phase)" = Released ]; check unused-pv-released $? "the cut is Released"
agent --oneshot-action delete --oneshot-name unused >/dev/null 2>&1
[ "$(snaps)" = 0 ]; check unused-pv-deleted $? "delete"
vgreduce -q vg0 /dev/vdb >/dev/null 2>&1


echo "== restore: clones of member snapshots (agent --oneshot-action restore / attach / unrestore)"
# Cut without a freeze (LVM's own suspend; both kernels), clone, compare, write to the clone.
files_sha() { (cd "$1" && find . -type f ! -name probe | sort | xargs sha256sum); }
snap_mount() { # snap_mount LV DIR: the member snapshot (its log replayed by the mount, as verify does)
  case $1 in *thick*) ;; *) lvchange -q -ay -K "vg0/$1" </dev/null ;; esac
  mkdir -p "$2" && mount -t xfs -o nouuid "/dev/vg0/$1" "$2"
}
restore_round() { # restore_round NAME VOLUME KIND(thin|thick) METHOD
  name=$1; vol=$2; kind=$3; method=$4
  files_sha "/mnt/$vol" > "/tmp/$name.sha"
  out=$(agent --oneshot-volume "/mnt/$vol" --oneshot-name "$name" --oneshot-freeze Disabled --thick-cow-size 64M 2>/tmp/agent.err)
  [ "$(echo "$out" | json_field phase)" = Released ]; check "$name-cut" $? "the member snapshot of $vol is cut"
  snap=$(snap_name local "$name" "$vol")
  t0=$(now_ms); out=$(agent --oneshot-action restore --oneshot-name "$name" 2>/tmp/agent.err); rc=$?; t1=$(now_ms)
  echo "AGENT $name-restore rc=$rc wall_ms=$((t1-t0)) $out"; sed 's/^/    | /' /tmp/agent.err | tail -3
  clone=$(echo "$out" | json_field path); lv=${clone#/dev/vg0/}
  [ $rc = 0 ] && [ -b "$clone" ]; check "$name-restored" $? "the clone is published at ${clone:-nothing}"
  echo "$out" | grep -q "\"backend\":\"lvm-$kind\"" && echo "$out" | grep -q "\"method\":\"$method\"" && echo "$out" | grep -q '"filesystem":"xfs"'
  check "$name-reported" $? "backend lvm-$kind, method $method, filesystem xfs"
  lvs --noheadings -o lv_tags "vg0/$lv" 2>/dev/null | tr ',' '\n' | tr -d ' ' | grep -qx "tandem-owner-restore-oneshot-local-$name"
  check "$name-owner-tag" $? "the clone is tagged with its restore"
  if [ "$kind" = thick ]; then
    mibs=$(echo "$out" | sed -n 's/.*"mibPerSec":\([0-9.]*\).*/\1/p'); size=$(echo "$out" | sed -n 's/.*"sizeBytes":\([0-9]*\).*/\1/p')
    echo "THROUGHPUT thick-copy ${mibs:-?} MiB/s ($((${size:-0} / 1048576)) MiB in $((t1-t0)) ms wall, kernel $(uname -r), TCG)"
    [ -n "$mibs" ]; check "$name-throughput" $? "copy throughput reported"
  fi
  mkdir -p "/mnt/c-$name"
  ! mount -t xfs "$clone" "/mnt/c-$name" 2>/dev/null; check "$name-needs-nouuid" $? "beside its mounted origin, the XFS clone does not mount without nouuid"
  mount -t xfs -o nouuid "$clone" "/mnt/c-$name"; check "$name-mount" $? "mounted with nouuid"
  (cd "/mnt/c-$name" && sha256sum -c "/tmp/$name.sha" >/dev/null 2>&1); check "$name-data" $? "the clone's files are the snapshot's"
  echo "clone only" > "/mnt/c-$name/clone-only.txt"; dd if=/dev/urandom of="/mnt/c-$name/synced.bin" bs=1M count=4 conv=notrunc 2>/dev/null; sync
  (cd "/mnt/$vol" && sha256sum -c "/tmp/$name.sha" >/dev/null 2>&1) && [ ! -e "/mnt/$vol/clone-only.txt" ]
  check "$name-origin-untouched" $? "writes to the clone do not reach the origin"
  snap_mount "$snap" "/mnt/s-$name"
  (cd "/mnt/s-$name" && sha256sum -c "/tmp/$name.sha" >/dev/null 2>&1) && [ ! -e "/mnt/s-$name/clone-only.txt" ]
  check "$name-snapshot-untouched" $? "writes to the clone do not reach the snapshot"
  umount "/mnt/s-$name"; umount "/mnt/c-$name"
  # The member snapshot goes (the cut is deleted): the clone does not depend on it.
  agent --oneshot-action delete --oneshot-name "$name" >/dev/null 2>&1
  ! lvs "vg0/$snap" >/dev/null 2>&1 && lvs "vg0/$lv" >/dev/null 2>&1; check "$name-independent" $? "the clone survives deleting the member snapshot"
  # A "reboot": the clone LV is deactivated; attach (and a re-run of restore) activates it again.
  lvchange -q -an "vg0/$lv"; [ ! -e "$clone" ]; check "$name-deactivated" $? "deactivated: $clone is gone"
  out=$(agent --oneshot-action attach --oneshot-name "$name" 2>/tmp/agent.err); rc=$?
  [ $rc = 0 ] && [ -b "$clone" ]; check "$name-attach" $? "attach activates it again"
  lvchange -q -an "vg0/$lv"
  out=$(agent --oneshot-action restore --oneshot-name "$name" 2>/tmp/agent.err); rc=$?
  [ $rc = 0 ] && [ -b "$clone" ] && echo "$out" | grep -q '"attached"'; check "$name-rerun" $? "restore again attaches the same clone"
  mount -t xfs -o nouuid "$clone" "/mnt/c-$name" && [ "$(cat "/mnt/c-$name/clone-only.txt")" = "clone only" ]
  check "$name-kept" $? "the clone kept its writes"
  umount "/mnt/c-$name"
  agent --oneshot-action unrestore --oneshot-name "$name" >/tmp/unrestore.out 2>&1; rc=$?; tail -1 /tmp/unrestore.out | cut -c1-300 | sed 's/^/    | /'
  [ $rc = 0 ] && ! lvs "vg0/$lv" >/dev/null 2>&1; check "$name-unrestore" $? "unrestore removes the clone LV"
}
restore_round rthin vol2 thin Clone
echo "== restore: identity (a planted LV at the clone's name; a snapshot without its cut's tag)"
out=$(agent --oneshot-volume /mnt/vol1 --oneshot-name rplant --oneshot-freeze Disabled 2>/tmp/agent.err)
[ "$(echo "$out" | json_field phase)" = Released ]; check rplant-cut $? "a cut to restore"
planted="tandem-r.local.vol1.$(printf %s restore-oneshot-local-rplant | sha256sum | cut -c1-8)"
lvcreate -q -V 64M -T vg0/pool -n "$planted" >/dev/null; check rplant-setup $? "planted an untagged thin LV $planted"
out=$(agent --oneshot-action restore --oneshot-name rplant 2>&1); rc=$?
[ $rc != 0 ] && echo "$out" | grep -q "already exists"; check rplant-refused $? "restore refuses the planted LV (already exists)"
agent --oneshot-action unrestore --oneshot-name rplant >/dev/null 2>&1
lvs "vg0/$planted" >/dev/null 2>&1; check rplant-kept $? "the planted LV survived the restore and the unrestore"
lvremove -q -f "vg0/$planted" >/dev/null 2>&1
agent --oneshot-action unrestore --oneshot-name rplant >/dev/null 2>&1; check rplant-unrestore $? "unrestore once the planted LV is gone"
rsnap=$(snap_name local rplant vol1)
lvchange -q --deltag tandem-owner-oneshot-local-rplant "vg0/$rsnap" >/dev/null
out=$(agent --oneshot-action restore --oneshot-name rplant 2>&1); rc=$?
[ $rc != 0 ] && echo "$out" | grep -q "not this cut's snapshot"; check rsnap-not-ours $? "a snapshot without its cut's tag is not cloned"
[ "$(lvs --noheadings -o lv_name vg0 | grep -c tandem-r)" = 0 ]; check rsnap-nothing-made $? "no clone LV made"
agent --oneshot-action unrestore --oneshot-name rplant >/dev/null 2>&1
lvremove -q -f "vg0/$rsnap" >/dev/null 2>&1; agent --oneshot-action delete --oneshot-name rplant >/dev/null 2>&1

lvcreate -q -L 320M -n thick2 vg0 && mkfs.xfs -q -f /dev/vg0/thick2 && mkdir -p /mnt/thick2 && mount /dev/vg0/thick2 /mnt/thick2 \
  && dd if=/dev/urandom of=/mnt/thick2/synced.bin bs=1M count=64 2>/dev/null && echo thick2 > /mnt/thick2/marker.txt && sync
check rthick-setup $? "a thick XFS volume of 320 MiB"
restore_round rthick thick2 thick Copy
echo "== restore: a thick copy that fails midway (its snapshot overflows) removes the new LV"
out=$(agent --oneshot-volume /mnt/thick2 --oneshot-name rfail --oneshot-freeze Disabled --thick-cow-size 8M 2>/tmp/agent.err)
[ "$(echo "$out" | json_field phase)" = Released ]; check rfail-cut $? "a thick snapshot with 8 MiB of copy-on-write space"
umount /mnt/thick2
( agent --oneshot-action restore --oneshot-name rfail >/tmp/rfail.out 2>&1; echo "RC=$?" >>/tmp/rfail.out ) &
rp=$!
# Once the clone LV exists the copy is under way: overflow the snapshot, whose reads then fail.
i=0; while ! lvs --noheadings -o lv_name vg0 2>/dev/null | grep -q 'tandem-r.local.thick2' && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done
dd if=/dev/urandom of=/dev/vg0/thick2 bs=1M count=24 seek=16 conv=fsync 2>/dev/null
wait $rp
grep 'rror' /tmp/rfail.out | tail -1 | cut -c1-300 | sed 's/^/    | /'
! grep -q 'RC=0' /tmp/rfail.out; check rfail-failed $? "the restore failed"
[ "$(lvs --noheadings -o lv_name vg0 | grep -c tandem-r)" = 0 ]; check rfail-no-leftover $? "the half-copied clone LV was removed"
agent --oneshot-action delete --oneshot-name rfail >/dev/null 2>&1
lvremove -q -f vg0/thick2 >/dev/null 2>&1
[ "$(lvs --noheadings -o lv_name vg0 | grep -c tandem-r)" = 0 ]; check restore-no-leftover $? "no clone LV left"

for v in vol1 vol2 thick1; do umount /mnt/$v; done
vgchange -q -an vg0 >/dev/null 2>&1
echo "GUEST-RESULT pass=$PASS fail=$FAIL"
[ $FAIL = 0 ]
