# replication: the guest's agent ships to the host's collector (10.0.2.2,
# qemu user networking) while ext4 is written through the kernel's NBD
# client; `tidemark wait` (through the host's status API) returns once the
# replica has caught up; the agent stops cleanly. The host's hook
# (vm-images/host/replication.sh) then finds the replica identical to the
# "repl" disk image with qemu-img compare.
# timeout: 400

[ -n "${TM_COLLECTOR:-}" ] && [ -n "${TM_API:-}" ] || fail "no tidemark.collector=/tidemark.api= (host hook missing?)"
[ -s /hostdata/token ] || fail "no /hostdata/token"
D=$(disk repl)
M=$TM_WORK/mnt
start_agent repl "$D" --collector "$TM_COLLECTOR" --token-file /hostdata/token
dev=$(nbd_connect "$AGENT_SOCK")
mkfs.ext4 -q -F -b 4096 -L replicated "$dev"
mount_fs "$dev" "$M"
dd if=/dev/urandom of="$M/a.bin" bs=1M count=8 2>/dev/null
cp -r /tm "$M/guest-scripts"
sync
dd if=/dev/urandom of="$M/b.bin" bs=1M count=4 2>/dev/null
rm "$M/a.bin"
umount_fs "$M"
nbd_disconnect "$dev"
tidemark wait --api "$TM_API" repl --timeout 5m || fail "tidemark wait: the replica did not catch up"
agent_status repl
stop_agent repl
log "replicated; the host compares the replica"
