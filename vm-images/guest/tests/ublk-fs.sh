# ublk-fs: the agent's ublk front end as a kernel block device.
# A disk that already holds ext4 and files is copied (the pre-protection
# copy), protected with `--ublk`, and /dev/ublkbN used as a filesystem:
# mounted with discard, files written, checksummed, some deleted (DISCARD),
# fsck clean through the device. A clean stop deletes the device. Then
# `tidemark journal replay` onto the copy gives the disk byte for byte,
# and the disk itself is clean ext4.
# timeout: 300

D=$(disk ublk)
M=$TM_WORK/mnt
# 1. A filesystem with files, before protection.
# The filesystem takes the first 192 MiB; raw writes below go past it.
mkfs.ext4 -q -F -b 4096 -L before "$D" 49152
mount_fs "$D" "$M"
dd if=/dev/urandom of="$M/before.bin" bs=1M count=4 2>/dev/null
cp -r /tm "$M/guest-scripts"
umount_fs "$M"

# 2. The pre-protection copy.
dd if="$D" of="$TM_SCRATCH/pre.img" bs=1M 2>/dev/null

# 3. Protect it as /dev/ublkbN.
# Two queues (two server threads), 32 requests each: not the defaults.
start_ublk_agent uf "$D" --queues 2 --depth 32
assert_eq "$(block_size "$UBLK_DEV")" "$(block_size "$D")" "size of $UBLK_DEV"
assert_eq "$(ls "/sys/block/${UBLK_DEV#/dev/}/mq" | wc -l)" 2 "hardware queues of $UBLK_DEV"
grep -q . "/sys/block/${UBLK_DEV#/dev/}/queue/discard_max_bytes" &&
  [ "$(cat "/sys/block/${UBLK_DEV#/dev/}/queue/discard_max_bytes")" -gt 0 ] ||
  fail "$UBLK_DEV does not offer discard"
assert_eq "$(cat "/sys/block/${UBLK_DEV#/dev/}/queue/write_cache")" "write back" "write cache of $UBLK_DEV"

# 4. Use it.
mount_fs "$UBLK_DEV" "$M" -o discard
[ -f "$M/before.bin" ] || fail "before.bin not visible through the ublk device"
write_files "$M"
sync
rm -r "$M/guest-scripts" "$M/after/big"
rm "$M/after/f3" "$M/after/f7"
sum_files "$M"
sync
umount_fs "$M"
e2fsck -fn "$UBLK_DEV" >"$TM_WORK/fsck-ublk.log" 2>&1 || fail "e2fsck through the ublk device found errors"
mount_fs "$UBLK_DEV" "$M" -o ro
(cd "$M" && sha256sum -c -s "$TM_WORK/sums") || fail "checksums differ after a remount"
umount_fs "$M"
# Raw writes through the device: O_DIRECT, O_SYNC (FUA) and write-zeroes too.
pattern_block uf 1 >"$TM_WORK/blk"
dd if="$TM_WORK/blk" of="$UBLK_DEV" bs=4096 seek=51200 oflag=direct conv=notrunc,fsync 2>"$TM_WORK/dd.log" ||
  fail "direct write to $UBLK_DEV failed: $(cat "$TM_WORK/dd.log")"
if [ -x /tools/bin/fio ]; then
  /tools/bin/fio --name=fua --filename="$UBLK_DEV" --ioengine=psync --direct=1 --sync=1 --rw=write \
    --bs=4k --offset=204M --size=256k --verify=crc32c >"$TM_WORK/fio-fua.log" 2>&1 ||
    fail "O_SYNC writes through $UBLK_DEV failed: $(tail -n 3 "$TM_WORK/fio-fua.log" | tr '\n' ' ')"
fi
blkdiscard -z -o $((210 << 20)) -l $((256 << 10)) "$UBLK_DEV" 2>/dev/null || log "blkdiscard -z not available"
st=$(agent_status uf)
log "agent: $st"
[ "$(echo "$st" | json_num flushes)" -gt 0 ] || fail "the agent saw no FLUSH from the kernel"
[ "$(echo "$st" | json_num writes)" -gt 0 ] || fail "the agent saw no writes"
[ "$(echo "$st" | json_num trims)" -gt 0 ] || fail "the agent saw no DISCARD (mount -o discard, rm)"
echo "$st" | grep -q "\"served_as\":\"ublk $UBLK_DEV\"" || fail "agent-status does not say it serves $UBLK_DEV"
dev=$UBLK_DEV
stop_agent uf
[ ! -e "$dev" ] || fail "$dev is still there after the agent's clean stop"
[ ! -e "$AGENT_STATE/ublk.json" ] || fail "ublk.json left in the state directory after a clean stop"

# 5. The journal holds every write: replay onto the copy gives the disk.
tidemark journal dump --state "$AGENT_STATE" | tail -n 6
tidemark journal replay --state "$AGENT_STATE" --onto "$TM_SCRATCH/pre.img"
cmp "$TM_SCRATCH/pre.img" "$D" || fail "journal replay onto the pre-protection copy differs from the disk"
dd if="$D" bs=4096 skip=51200 count=1 2>/dev/null | cmp - "$TM_WORK/blk" || fail "the direct write is not on the disk"
e2fsck -fn "$D" >"$TM_WORK/fsck-disk.log" 2>&1 || fail "e2fsck of the disk found errors"
rm -f "$TM_SCRATCH/pre.img"
log "replay == disk; fsck clean; device deleted"
