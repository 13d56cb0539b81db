# nbd-kernel: the agent's NBD server behind the kernel's NBD client.
# A disk that already holds ext4 and files is copied (the pre-protection
# copy), protected, connected to /dev/nbdN with nbd-client, and used as a
# filesystem: files written, checksummed, some deleted, fsck clean through
# the shim. After a clean stop, `tidemark journal replay` onto the copy
# gives the disk byte for byte, and the disk itself is still clean ext4.
# timeout: 300

D=$(disk protect)
M=$TM_WORK/mnt
# 1. A filesystem with files, before protection.
mkfs.ext4 -q -F -b 4096 -L before "$D"
mount_fs "$D" "$M"
dd if=/dev/urandom of="$M/before.bin" bs=1M count=4 2>/dev/null
cp -r /tm "$M/guest-scripts"
umount_fs "$M"

# 2. The pre-protection copy.
dd if="$D" of="$TM_SCRATCH/pre.img" bs=1M 2>/dev/null
log "pre-protection copy: $(ls -l "$TM_SCRATCH/pre.img" | awk '{print $5}') bytes"

# 3. Protect it; the kernel NBD client on the agent's socket.
start_agent nk "$D"
dev=$(nbd_connect "$AGENT_SOCK")
log "connected $dev ($(block_size "$dev") bytes)"
assert_eq "$(block_size "$dev")" "$(block_size "$D")" "size of $dev"

# 4. Use it.
mount_fs "$dev" "$M"
[ -f "$M/before.bin" ] || fail "before.bin not visible through the shim"
write_files "$M"
rm -r "$M/guest-scripts"
rm "$M/after/f3" "$M/after/f7"
sum_files "$M"
sync
umount_fs "$M"
e2fsck -fn "$dev" >"$TM_WORK/fsck-nbd.log" 2>&1 || fail "e2fsck through the shim found errors"
mount_fs "$dev" "$M" -o ro
(cd "$M" && sha256sum -c -s "$TM_WORK/sums") || fail "checksums differ after a remount"
umount_fs "$M"
st=$(agent_status nk)
log "agent: $st"
[ "$(echo "$st" | json_num flushes)" -gt 0 ] || fail "the agent saw no FLUSH from the kernel"
[ "$(echo "$st" | json_num writes)" -gt 0 ] || fail "the agent saw no writes"
nbd_disconnect "$dev"
stop_agent nk

# 5. The journal holds every write: replay onto the copy gives the disk.
tidemark journal dump --state "$AGENT_STATE" | tail -n 6
tidemark journal replay --state "$AGENT_STATE" --onto "$TM_SCRATCH/pre.img"
cmp "$TM_SCRATCH/pre.img" "$D" || fail "journal replay onto the pre-protection copy differs from the disk"
e2fsck -fn "$D" >"$TM_WORK/fsck-disk.log" 2>&1 || fail "e2fsck of the disk found errors"
rm -f "$TM_SCRATCH/pre.img"
log "replay == disk; fsck clean"
