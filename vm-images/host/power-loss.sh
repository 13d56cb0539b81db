# shellcheck shell=bash
# Host hook of the power-loss test. Before the boot: kill -9 qemu at the
# console line "FLUSH-ACKED <n>". After: from the disk images alone,
#  1. the scratch disk (ext4, the agent's state directory) recovers its own
#     journal (e2fsck) and the state directory is copied out (debugfs rdump);
#  2. `tidemark journal dump` shows a write record covering each of the n
#     blocks written before the acknowledged FLUSH;
#  3. the protect disk image holds those n blocks, and every later block is
#     either whole or absent (zeros);
#  4. `tidemark journal replay` onto a zero disk gives the n blocks too;
#  5. tidemark-agent, started on the images again (on the host: another boot
#     id), recovers on the machine-crash path — it re-applies the journal,
#     logs that the machine stopped uncleanly and owes a full resync — serves
#     the n blocks over NBD, and stops cleanly;
#  6. the image still holds the n blocks afterwards.

host_before_power_loss() {
  kill_on '^FLUSH-ACKED [0-9]+$'
}

STRIDE=65536

pl_fail() {
  [ -z "${PL_LINK:-}" ] || rm -f "$PL_LINK"
  echo "HOST-FAIL: $*"
  exit 1
}

# block_at FILE I: block I of the test (4 KiB at I * STRIDE).
block_at() { dd if="$1" bs=4096 skip=$(($2 * STRIDE / 4096)) count=1 status=none; }
is_zero() { [ -z "$(tr -d '\0' <"$1" | head -c 1)" ]; }
# blocks_as_written FILE N WHERE: blocks 1..N of FILE are the test's, or fail
# saying block i differs WHERE.
blocks_as_written() {
  local i
  for ((i = 1; i <= $2; i++)); do
    pattern_block pl "$i" >"$W/want"
    block_at "$1" "$i" | cmp -s "$W/want" - || pl_fail "block $i differs $3"
  done
}

host_after_power_loss() {
  case $KILL_LINE in
    FLUSH-ACKED\ *) ;;
    *) pl_fail "qemu was not killed at FLUSH-ACKED (guest: $GUEST_RESULT, qemu exit $QEMU_RC)" ;;
  esac
  local n=${KILL_LINE#FLUSH-ACKED } img scratch W st i tm agent
  img=$(disk_path protect)
  scratch=$(disk_path scratch)
  W=$RUN/power-loss-check
  tm=$GUEST_BIN/tidemark
  agent=$GUEST_BIN/tidemark-agent
  rm -rf "$W"
  mkdir -p "$W"
  # Unix socket paths (the agent's NBD and control sockets) hold 107 bytes,
  # and $RUN is under wherever the repository is: work through a short
  # symlink to $W.
  PL_LINK=$(mktemp -u /tmp/tm-pl.XXXXXX)
  ln -s "$W" "$PL_LINK"
  W=$PL_LINK
  echo "a FLUSH was acknowledged after blocks 1..$n had been; qemu was killed at once"

  # 1. the state directory
  local rc=0
  e2fsck -fy "$scratch" >"$W/e2fsck.log" 2>&1 || rc=$?
  cat "$W/e2fsck.log"
  [ $rc -le 1 ] || pl_fail "e2fsck of the scratch disk image: status $rc"
  debugfs -R "rdump /${PL_TEST:-power-loss}/pl.state $W" "$scratch" >"$W/rdump.log" 2>&1 || true
  st=$W/pl.state
  [ -f "$st/disk.json" ] || { cat "$W/rdump.log"; pl_fail "no agent state directory on the scratch disk image"; }
  ls -la "$st" "$st/journal"

  # 2. the journal covers every block written before the FLUSH
  "$tm" journal dump --state "$st" --json >"$W/journal.json" || pl_fail "tidemark journal dump failed"
  "$tm" journal dump --state "$st" | tail -n 4
  for ((i = 1; i <= n; i++)); do
    awk -v o=$((i * STRIDE)) '
      /"kind":"write"/ {
        match($0, /"offset":[0-9]+/); off = substr($0, RSTART + 9, RLENGTH - 9) + 0
        match($0, /"length":[0-9]+/); len = substr($0, RSTART + 9, RLENGTH - 9) + 0
        if (off <= o && off + len >= o + 4096) { found = 1; exit }
      }
      END { exit !found }' "$W/journal.json" || pl_fail "block $i (acknowledged before the FLUSH) has no write record in the journal"
  done
  echo "journal: all $n blocks written before the FLUSH have write records"

  # 3. the disk image (blocks after the FLUSH one by one only if the
  #    region they span is not all zeros)
  local later_whole=0 later_zero=0 last=2000
  if cmp -s <(dd if="$img" bs=$STRIDE skip=$((n + 1)) count=$((2000 - n)) status=none) \
    <(head -c $(((2000 - n) * STRIDE)) /dev/zero); then
    later_zero=$((2000 - n)) last=$n
  fi
  for ((i = 1; i <= last; i++)); do
    pattern_block pl "$i" >"$W/want"
    block_at "$img" "$i" >"$W/got"
    if cmp -s "$W/want" "$W/got"; then
      [ $i -gt "$n" ] && later_whole=$((later_whole + 1))
    elif [ $i -le "$n" ]; then
      pl_fail "block $i (acknowledged before the FLUSH) is not on the disk image"
    elif is_zero "$W/got"; then
      later_zero=$((later_zero + 1))
    else
      pl_fail "block $i (written after the FLUSH) is torn on the disk image"
    fi
  done
  echo "disk image: blocks 1..$n present; after the FLUSH $later_whole whole and $later_zero absent, none torn"

  # 4. replay onto a zero disk
  truncate -s "$(stat -c %s "$img")" "$W/zero.img"
  "$tm" journal replay --state "$st" --onto "$W/zero.img" || pl_fail "tidemark journal replay failed"
  blocks_as_written "$W/zero.img" "$n" "after journal replay"
  rm -f "$W/zero.img"
  echo "journal replay: blocks 1..$n as written"

  # 5. the agent recovers on the machine-crash path
  "$agent" protect --disk "$img" --state "$st" --disk-id pl --listen "unix:$W/pl.sock" >"$W/agent.log" 2>&1 &
  local apid=$!
  echo "$apid" >>"$RUN/.pids"
  for ((i = 0; i < 300; i++)); do
    [ -S "$W/pl.sock" ] && break
    kill -0 "$apid" 2>/dev/null || { cat "$W/agent.log"; pl_fail "the agent exited while recovering"; }
    sleep 0.1
  done
  [ -S "$W/pl.sock" ] || { cat "$W/agent.log"; pl_fail "the agent did not serve within 30 s"; }
  cat "$W/agent.log"
  grep -q 'last_stop=MachineCrash' "$W/agent.log" || pl_fail "the agent did not see a machine crash (last_stop)"
  grep -q 'machine stopped uncleanly' "$W/agent.log" || pl_fail "the agent did not report the machine crash"
  grep -q 'unclean stop: re-applied the journal' "$W/agent.log" || pl_fail "the agent did not re-apply the journal"
  local status
  status=$("$tm" agent-status --agent "$st" --json) || pl_fail "tidemark agent-status failed"
  echo "$status"
  echo "$status" | grep -q '"resync_required":true' || pl_fail "agent-status does not say a full resync is owed"
  if command -v nbdcopy >/dev/null 2>&1; then
    nbdcopy "nbd+unix:///?socket=$W/pl.sock" "$W/served.img" || pl_fail "nbdcopy from the recovered agent failed"
    blocks_as_written "$W/served.img" "$n" "as served by the recovered agent"
    rm -f "$W/served.img"
    echo "served over NBD after recovery: blocks 1..$n as written"
  else
    echo "nbdcopy not installed: the served data is not read back (the image is checked below)"
  fi
  kill -TERM "$apid"
  rc=0
  wait "$apid" || rc=$?
  [ $rc = 0 ] || { tail -n 5 "$W/agent.log"; pl_fail "the recovered agent exited with $rc on SIGTERM"; }

  # 6. the image after recovery
  blocks_as_written "$img" "$n" "on the image after recovery"
  rm -f "$PL_LINK"
  echo "power loss: every write acknowledged before the FLUSH survived; machine-crash recovery OK"
}
