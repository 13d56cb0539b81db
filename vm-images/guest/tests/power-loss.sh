# power-loss: the whole VM dies (the host kill -9s qemu) right after a FLUSH
# through the kernel NBD client was acknowledged, while writes are still
# in flight. The agent's backing disk (protect, vda) and its journal (on the
# scratch disk, vdb) are virtio disks with cache=none, so what the guest
# had flushed is in the image files.
#
# A writer puts numbered 4 KiB blocks (block i at i * 64 KiB) on /dev/nbdN
# with O_DIRECT, one dd each, and records the last one acknowledged. Once
# at least TM_PL_BLOCKS (48) are, the test notes the last acknowledged block
# k, issues a FLUSH (fsync of the device) and, when it returns, prints
# "FLUSH-ACKED <k>" to the console; the writer goes on until the VM dies.
# The host's hook (vm-images/host/power-loss.sh) then checks that blocks
# 1..k are in the journal and on the disk image, that no later block is
# torn, and that the agent recovers on the machine-crash path.
# With tidemark.collector= on the command line (the host hook starts a
# collector and target), the agent replicates, and 64 MiB of data is on the
# disk and replicated before the writer starts: the host then checks that
# the resync after the machine crash sends what differs, not the disk.
# Must be the last test of its boot (suites/power-loss).
# timeout: 240

D=$(disk protect)
STRIDE=65536
MAX=2000
# The front end: the kernel NBD client (this test), or ublk
# (power-loss-ublk.sh sets PL_FRONT=ublk and sources this file).
set --
if [ -n "${TM_COLLECTOR:-}" ]; then
  [ -s /hostdata/token ] || fail "no /hostdata/token"
  set -- --collector "$TM_COLLECTOR" --token-file /hostdata/token --tls /hostdata/tls-agent
fi
if [ "${PL_FRONT:-nbd}" = ublk ]; then
  start_ublk_agent pl "$D" "$@"
  dev=$UBLK_DEV
else
  start_agent pl "$D" "$@"
  dev=$(nbd_connect "$AGENT_SOCK")
fi
if [ -n "${TM_COLLECTOR:-}" ]; then
  # Data a whole-disk resync would send again (past the writer's blocks).
  dd if=/dev/urandom of="$dev" bs=1M seek=128 count=64 oflag=direct conv=notrunc 2>/dev/null || fail "prefill of $dev"
  sync "$dev" || fail "fsync of $dev after the prefill"
  tidemark wait --api "$TM_API" pl --timeout 3m || fail "tidemark wait: the replica did not catch up before the crash"
fi

echo 0 >"$TM_WORK/acked"
(
  i=1
  while [ $i -le $MAX ]; do
    pattern_block pl "$i" | dd of="$dev" bs=4096 seek=$((i * STRIDE / 4096)) oflag=direct conv=notrunc 2>/dev/null || exit 1
    echo "$i" >"$TM_WORK/acked.new"
    mv "$TM_WORK/acked.new" "$TM_WORK/acked"
    i=$((i + 1))
  done
) &
writer=$!
wait_until 120 "${TM_PL_BLOCKS:-48} acknowledged writes" eval "[ \"\$(cat $TM_WORK/acked)\" -ge ${TM_PL_BLOCKS:-48} ]"
k=$(cat "$TM_WORK/acked")
sync "$dev" || fail "fsync of $dev (FLUSH) failed"
[ "$(agent_status pl | json_num flushes)" -gt 0 ] || fail "the agent saw no FLUSH"
console "FLUSH-ACKED $k"
log "acknowledged before the FLUSH: blocks 1..$k; now $(cat "$TM_WORK/acked")"
# The host kills the VM now; if it does not, the test fails (bounded).
i=0
while [ $i -lt 600 ] && kill -0 "$writer" 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
fail "still running after the FLUSH-ACKED marker: the host did not kill the VM"
