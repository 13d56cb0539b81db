# shellcheck shell=bash
# Host hook of the replication test: a secondary site on the host's
# loopback — tidemark-target and tidemark-collector from the host's release
# build — which the guest's agent reaches as 10.0.2.2 through qemu's user
# networking; afterwards the replica must be identical to the "repl" disk
# image, and its filesystem clean.
#
# Hook API (vm-images/run-tests): host_before_<test> runs before the boot,
# host_after_<test> after qemu has exited; both in subshells with set -e.
# Return 0 = ok, 2 = skipped, else failed (a "HOST-FAIL: reason" line names
# the reason in the summary).

host_before_replication() {
  host_site repl --spool-cap 1G
}

host_after_replication() {
  if [ "$GUEST_RESULT" != PASS ]; then
    echo "the guest part did not pass ($GUEST_RESULT): nothing to compare"
    return 2
  fi
  local disk replica
  disk=$(disk_path repl)
  replica=$RUN/site/data/repl/replica.raw
  "$HOST_BIN/tidemark" status --api "$REPL_API" || true
  [ -f "$replica" ] || { echo "HOST-FAIL: no replica at $replica"; return 1; }
  if ! qemu-img compare -f raw -F raw "$disk" "$replica"; then
    echo "HOST-FAIL: the replica differs from the guest's repl disk"
    return 1
  fi
  echo "qemu-img compare: the replica is identical to the repl disk"
  cp --sparse=always "$replica" "$RUN/replica-copy.img"
  e2fsck -fn "$RUN/replica-copy.img" || { echo "HOST-FAIL: e2fsck of the replica found errors"; return 1; }
  rm -f "$RUN/replica-copy.img"
}
