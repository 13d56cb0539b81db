# shellcheck shell=bash
# Host hook of the power-loss test. Before the boot: kill -9 qemu at the
# console line "FLUSH-ACKED <n>". After: from the disk images alone,
#  1. the scratch disk (ext4, the agent's state directory) recovers its own
#     journal (e2fsck) and the state directory is copied out (debugfs rdump);
#  2. `tidemark journal dump` shows a write record covering each of the n
#     blocks written before the acknowledged FLUSH;
#  3. the protect disk image holds those n blocks, and every later block is
#     either whole or absent (zeros);
#  4. `tidemark journal replay` onto a zero disk gives the n blocks too
#     (without replication: acks recycle the journal's head);
#  5. tidemark-agent, started on the images again (on the host: another boot
#     id), recovers on the machine-crash path — it re-applies the journal,
#     logs that the machine stopped uncleanly and owes a full resync — serves
#     the n blocks over NBD, and stops cleanly;
#  6. the image still holds the n blocks afterwards;
#  7. replication (power-loss, not power-loss-ublk: the guest's agent shipped to a collector and target on
#     the host, which outlive the crash): once the collector has forwarded
#     what it holds, the agent is started on the images with the collector
#     again; the whole-disk resync the crash owes hash-compares, so it
#     sends the 64 KiB chunks that differ between image and replica (plus
#     what was hot in the journal), not the disk; the replica then equals
#     the image.

host_before_power_loss() {
  kill_on '^FLUSH-ACKED [0-9]+$'
  # The ublk variant keeps the unreplicated checks (its journal is never
  # recycled, so step 4 replays all of it onto a zero disk).
  [ "${1:-}" != no-replication ] || return 0
  host_site pl
}

# pl_field NAME: disk pl's NAME in the host collector's status.
pl_field() {
  "$HOST_BIN/tidemark" status --api "$PL_API" --json |
    python3 -c "import json,sys; print([d for d in json.load(sys.stdin)['disks'] if d['disk_id']=='pl'][0]['$1'])"
}

# differing_chunks A B: the 64 KiB chunks that differ between two files.
differing_chunks() {
  python3 -c '
import sys
a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
n = 0
while True:
    x, y = a.read(1 << 16), b.read(1 << 16)
    if not x and not y:
        break
    n += x != y
print(n)' "$1" "$2"
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

  # 4. replay onto a zero disk (when nothing was replicated: the
  #    collector's acks recycle the journal's head)
  if [ -z "${PL_API:-}" ]; then
    truncate -s "$(stat -c %s "$img")" "$W/zero.img"
    "$tm" journal replay --state "$st" --onto "$W/zero.img" || pl_fail "tidemark journal replay failed"
    blocks_as_written "$W/zero.img" "$n" "after journal replay"
    rm -f "$W/zero.img"
    echo "journal replay: blocks 1..$n as written"
  fi

  # 5. the agent recovers on the machine-crash path
  "$agent" protect --disk "$img" --state "$st" --disk-id pl --listen "unix:$W/pl.sock" >"$W/agent.log" 2>&1 &
  local apid=$!
  echo "$apid" >>"$RUN/.pids"
  # The socket is bound before the journal is re-applied: wait for "serving".
  for ((i = 0; i < 300; i++)); do
    grep -q ' serving' "$W/agent.log" && break
    kill -0 "$apid" 2>/dev/null || { cat "$W/agent.log"; pl_fail "the agent exited while recovering"; }
    sleep 0.1
  done
  grep -q ' serving' "$W/agent.log" || { cat "$W/agent.log"; pl_fail "the agent did not serve within 30 s"; }
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

  # 7. the resync after the crash sends what differs
  if [ -z "${PL_API:-}" ]; then
    rm -f "$PL_LINK"
    echo "power loss: every write acknowledged before the FLUSH survived; machine-crash recovery OK"
    return 0
  fi
  local replica=$RUN/site/data/pl/replica.raw applied acked chunks p0 p1 sent limit
  [ -f "$replica" ] || pl_fail "no replica at $replica (the guest's agent did not replicate)"
  for ((i = 0; i < 300; i++)); do
    applied=$(pl_field applied_seq) acked=$(pl_field acked_seq)
    [ "$applied" -ge "$acked" ] && break
    sleep 0.1
  done
  [ "$applied" -ge "$acked" ] || pl_fail "the collector did not forward what it holds (applied $applied < acked $acked)"
  chunks=$(differing_chunks "$img" "$replica")
  p0=$(pl_field payload_bytes)
  echo "before the resync: $chunks chunks of 64 KiB differ between the image and the replica (applied seq $applied)"
  "$agent" protect --disk "$img" --state "$st" --disk-id pl --listen "unix:$W/pl.sock" \
    --collector "$PL_COLLECTOR" --token-file "$RUN/token" --tls "$HOSTDATA/tls-agent" >"$W/agent2.log" 2>&1 &
  apid=$!
  echo "$apid" >>"$RUN/.pids"
  "$tm" wait --api "$PL_API" pl --timeout 3m || { tail -n 20 "$W/agent2.log"; pl_fail "tidemark wait after the crash"; }
  p1=$(pl_field payload_bytes)
  sent=$((p1 - p0))
  # What differs, 10 % over, and 1 MiB for what was hot in the journal.
  limit=$((chunks * 65536 * 11 / 10 + 1048576))
  echo "the resync after the crash sent $sent payload bytes (differing: $((chunks * 65536)), limit $limit; the disk holds 64 MiB of data beyond the writer's blocks)"
  [ "$sent" -le "$limit" ] || { tail -n 20 "$W/agent2.log"; pl_fail "the resync after the crash sent $sent bytes, over $limit"; }
  "$tm" agent-status --agent "$st" --json >"$W/status2.json" || pl_fail "tidemark agent-status failed"
  grep -q '"resync_required":false' "$W/status2.json" || { cat "$W/status2.json"; pl_fail "a resync is still owed after tidemark wait"; }
  grep -Eq '"compare_bytes":[1-9]' "$W/status2.json" || { cat "$W/status2.json"; pl_fail "the resync did not hash-compare"; }
  kill -TERM "$apid"
  rc=0
  wait "$apid" || rc=$?
  [ $rc = 0 ] || { tail -n 5 "$W/agent2.log"; pl_fail "the agent exited with $rc on SIGTERM after the resync"; }
  qemu-img compare -f raw -F raw "$img" "$replica" || pl_fail "the replica differs from the image after the resync"
  echo "replication: the resync after the crash sent $sent bytes, and the replica equals the image"
  rm -f "$PL_LINK"
  echo "power loss: every write acknowledged before the FLUSH survived; machine-crash recovery OK"
}
