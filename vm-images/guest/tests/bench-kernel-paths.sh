# bench-kernel-paths: not a test but a benchmark (run by
# bench/run-vm-bench, in no suite): the same fio jobs on the same virtio
# disk three ways in one boot — plain (/dev/vda), through the agent as a
# ublk device (/dev/ublkbN), and through the agent's NBD server and the
# kernel NBD client (/dev/nbdN) — interleaved, REPEAT rounds. Prints one
# line per run:
#   BENCH <path> <job> <round> <write KiB/s> <write IOPS>
# Under TCG absolute figures mean little; compare the paths as ratios.
# timeout: 1500

D=$(disk protect)
REPEAT=${TM_REPEAT:-3}
RUNTIME=${TM_RUNTIME:-8}
FIO=/tools/bin/fio
[ -x $FIO ] || fail "fio is not in this VM (the host needs fio for the tools disk)"

# run_job PATH JOB DEV ROUND
run_job() {
  case $2 in
    randwrite-4k) args="--rw=randwrite --bs=4k --iodepth=16" ;;
    seqwrite-1m) args="--rw=write --bs=1M --iodepth=4" ;;
    *) fail "unknown job $2" ;;
  esac
  # shellcheck disable=SC2086
  $FIO --name="$2" --filename="$3" --ioengine=libaio --direct=1 $args --size=192M \
    --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=terse --terse-version=3 \
    >"$TM_WORK/fio.out" 2>"$TM_WORK/fio.err" || fail "fio $2 on $1 failed: $(cat "$TM_WORK/fio.err")"
  awk -F';' -v p="$1" -v j="$2" -v r="$4" '{ printf "BENCH %s %s %s %s %s\n", p, j, r, $48, $49 }' "$TM_WORK/fio.out"
}

round=1
while [ $round -le "$REPEAT" ]; do
  for job in randwrite-4k seqwrite-1m; do
    run_job virtio "$job" "$D" $round

    start_ublk_agent bu "$D" --journal-cap 512M --bench-consume
    run_job ublk "$job" "$UBLK_DEV" $round
    stop_agent bu

    start_agent bn "$D" --journal-cap 512M --bench-consume
    dev=$(nbd_connect "$AGENT_SOCK")
    run_job kernel-nbd "$job" "$dev" $round
    nbd_disconnect "$dev"
    stop_agent bn
  done
  round=$((round + 1))
done
