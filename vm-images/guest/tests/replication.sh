# replication: the guest's agent ships to the host's collector (10.0.2.2,
# qemu user networking). The "repl" disk already holds ext4 with files when
# it is protected, so the initial sync carries real data, while more files
# are written, checksummed and deleted through the kernel's NBD client;
# `tidemark wait` (through the host's status API) returns once the replica
# has caught up; the agent stops cleanly. The host's hook
# (vm-images/host/replication.sh) then finds the replica identical to the
# "repl" disk image with qemu-img compare.
# timeout: 400

[ -n "${TM_COLLECTOR:-}" ] && [ -n "${TM_API:-}" ] || fail "no tidemark.collector=/tidemark.api= (host hook missing?)"
[ -s /hostdata/token ] || fail "no /hostdata/token"
D=$(disk repl)
M=$TM_WORK/mnt
# Data from before protection: the initial sync has to send it.
mkfs.ext4 -q -F -b 4096 -L replicated "$D"
mount_fs "$D" "$M"
dd if=/dev/urandom of="$M/before.bin" bs=1M count=8 2>/dev/null
cp -r /tm "$M/guest-scripts"
umount_fs "$M"

start_agent repl "$D" --collector "$TM_COLLECTOR" --token-file /hostdata/token --tls /hostdata/tls-agent
dev=$(nbd_connect "$AGENT_SOCK")
mount_fs "$dev" "$M"
dd if=/dev/urandom of="$M/a.bin" bs=1M count=8 2>/dev/null
sync
dd if=/dev/urandom of="$M/b.bin" bs=1M count=4 2>/dev/null
rm "$M/a.bin" "$M/guest-scripts/lib.sh"
sum_files "$M"
umount_fs "$M"
nbd_disconnect "$dev"
tidemark wait --api "$TM_API" repl --timeout 5m || fail "tidemark wait: the replica did not catch up"
st=$(agent_status repl)
echo "$st"
assert_eq "$(echo "$st" | json_str replication_mode)" streaming "the agent's replication mode"
stop_agent repl
export_file "$TM_WORK/sums" repl.sha256
log "replicated; the host compares the replica"
