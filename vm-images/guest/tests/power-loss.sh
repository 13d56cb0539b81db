# power-loss: the whole VM dies (the host kill -9s qemu) right after a FLUSH
# through the kernel NBD client was acknowledged. The agent's backing disk
# (protect, vda) and its journal (on the scratch disk) are virtio disks
# with cache=none, so what the guest had flushed is in the image files.
# The guest writes numbered 4 KiB blocks with O_DIRECT through /dev/nbdN,
# flushes (fsync of the device), prints "FLUSH-ACKED <n>" to the console
# and keeps writing until it is killed. The host's hook
# (vm-images/host/power-loss.sh) checks the images and the recovery.
# Must be the last test of its boot (suites/power-loss).
# timeout: 180

D=$(disk protect)
STRIDE=65536
start_agent pl "$D"
dev=$(nbd_connect "$AGENT_SOCK")
n=${TM_PL_BLOCKS:-48}
i=1
while [ $i -le "$n" ]; do
  pattern_block pl "$i" | dd of="$dev" bs=4096 seek=$((i * STRIDE / 4096)) oflag=direct conv=notrunc 2>/dev/null ||
    fail "O_DIRECT write of block $i failed"
  i=$((i + 1))
done
sync "$dev" || fail "fsync of $dev (FLUSH) failed"
[ "$(agent_status pl | json_num flushes)" -gt 0 ] || fail "the agent saw no FLUSH"
console "FLUSH-ACKED $n"
# Unflushed writes until the host pulls the plug (bounded: 2000 blocks, 120 s).
end=$(awk -v t="$(now)" 'BEGIN { print t + 120 }')
while [ $i -le 2000 ]; do
  pattern_block pl "$i" | dd of="$dev" bs=4096 seek=$((i * STRIDE / 4096)) oflag=direct conv=notrunc 2>/dev/null || true
  i=$((i + 1))
  awk -v t="$(now)" -v e="$end" 'BEGIN { exit !(t > e) }' && break
done
fail "still running after $((i - 1)) blocks: the host did not kill the VM"
