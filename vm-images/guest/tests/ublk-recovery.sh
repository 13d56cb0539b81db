# ublk-recovery: kill -9 of the agent under load, with user recovery.
# /dev/ublkbN is written by dd (sequential, O_DIRECT, a known file) and by
# fio (random 4 KiB writes with verification) while the agent is killed
# with SIGKILL three times and restarted each time on the same state
# directory: it re-attaches to the live device (UBLK_F_USER_RECOVERY) and
# the kernel re-issues what the dead agent had not finished. The clients
# must see no I/O error (dd and fio exit 0, fio's verify passes, no I/O
# error in the kernel log), the data dd wrote reads back, and the journal
# still holds every write: replay onto the pre-protection copy gives the
# disk.
# timeout: 420

D=$(disk ublk)
dd if="$D" of="$TM_SCRATCH/pre.img" bs=1M 2>/dev/null
dmesg -c >/dev/null 2>&1 || true

start_ublk_agent ur "$D"
dev=$UBLK_DEV
dd if=/dev/urandom of="$TM_WORK/load" bs=1M count=48 2>/dev/null
# Both clients repeat their work until the kills are done (at most 20
# rounds each), so every kill lands while they have writes in flight.
(
  rc=0 n=0
  while [ $rc = 0 ] && [ $n -lt 20 ]; do
    n=$((n + 1))
    dd if="$TM_WORK/load" of="$dev" bs=64k oflag=direct conv=notrunc,fsync 2>"$TM_WORK/dd.log" || rc=$?
    [ -f "$TM_WORK/kills.done" ] && break
  done
  echo "dd rounds: $n" >>"$TM_WORK/rounds"
  echo "$rc" >"$TM_WORK/dd.rc"
) &
DD=$!
FIO=
if [ -x /tools/bin/fio ]; then
  (
    rc=0 n=0
    while [ $rc = 0 ] && [ $n -lt 20 ]; do
      n=$((n + 1))
      /tools/bin/fio --name=recovery --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --offset=128M --size=32M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randseed=$n >"$TM_WORK/fio.log" 2>&1 || rc=$?
      [ -f "$TM_WORK/kills.done" ] && break
    done
    echo "fio rounds: $n" >>"$TM_WORK/rounds"
    echo "$rc" >"$TM_WORK/fio.rc"
  ) &
  FIO=$!
else
  log "fio is not in this VM: dd load only"
fi

kills=0
while [ $kills -lt 3 ]; do
  sleep 1.5
  [ ! -f "$TM_WORK/dd.rc" ] || fail "dd ended before kill $((kills + 1)): status $(cat "$TM_WORK/dd.rc")"
  kill9_agent ur
  kills=$((kills + 1))
  sleep 1
  [ -b "$dev" ] || fail "$dev went away when the agent was killed"
  start_ublk_agent ur "$D"
  assert_eq "$UBLK_DEV" "$dev" "device after restart $kills"
  grep -q "re-attaching to $dev" "$(agent_log ur)" || fail "agent did not re-attach to $dev"
done
touch "$TM_WORK/kills.done"
log "$kills kills done; waiting for the clients"
i=0
while [ ! -f "$TM_WORK/dd.rc" ] || { [ -n "$FIO" ] && [ ! -f "$TM_WORK/fio.rc" ]; }; do
  i=$((i + 1))
  [ $i -le 2400 ] || fail "the load did not finish within 240 s"
  sleep 0.1
done
wait $DD || true
[ -n "$FIO" ] && { wait $FIO || true; }
cat "$TM_WORK/rounds"
assert_eq "$(cat "$TM_WORK/dd.rc")" 0 "dd exit status (an I/O error reached the client?)"
if [ -n "$FIO" ]; then
  tail -n 5 "$TM_WORK/fio.log"
  assert_eq "$(cat "$TM_WORK/fio.rc")" 0 "fio exit status (I/O error or verify failure)"
fi
if dmesg | grep -i "${dev#/dev/}" | grep -iq "error"; then
  dmesg | grep -i "${dev#/dev/}" | tail -n 5
  fail "the kernel logged I/O errors on $dev"
fi
cmp -n $((48 << 20)) "$TM_WORK/load" "$dev" || fail "what dd wrote does not read back from $dev"
grep -c "unclean stop: re-applied the journal" "$(agent_log ur)" | grep -qx 3 ||
  fail "the agent did not recover from its journal after each kill"
# While the device waits for its server, another disk's agent asking for
# that number must be refused: re-attaching would hand it this disk's
# requests.
kill9_agent ur
other=$(disk protect)
if timeout 30 tidemark-agent protect --disk "$other" --state "$TM_SCRATCH/other.state" --disk-id other \
  --ublk --ublk-id "${dev#/dev/ublkb}" >"$TM_WORK/other.log" 2>&1; then
  fail "another disk's agent took over $dev"
fi
grep -q "does not say it is this disk's device" "$TM_WORK/other.log" ||
  fail "another disk's agent was not refused for the right reason: $(tail -n 2 "$TM_WORK/other.log" | tr '\n' ' ')"
start_ublk_agent ur "$D"
assert_eq "$UBLK_DEV" "$dev" "device after the refused takeover"
stop_agent ur
[ ! -e "$dev" ] || fail "$dev is still there after the agent's clean stop"

tidemark journal replay --state "$AGENT_STATE" --onto "$TM_SCRATCH/pre.img"
cmp "$TM_SCRATCH/pre.img" "$D" || fail "journal replay onto the pre-protection copy differs from the disk"
rm -f "$TM_SCRATCH/pre.img"
log "3 x kill -9 under load: no client error, data intact, replay == disk"
