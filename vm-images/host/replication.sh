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
  need_host_bins
  local cport tport aport
  tport=$(free_port)
  cport=$(free_port)
  aport=$(free_port)
  [ "$cport" != "$tport" ] && [ "$aport" != "$tport" ] && [ "$aport" != "$cport" ] || { cport=$((tport + 1)); aport=$((tport + 2)); }
  (umask 077; head -c 24 /dev/urandom | base64 >"$RUN/token")
  cp "$RUN/token" "$HOSTDATA/token"
  tls_issue vm-target target "$RUN/tls-target"
  tls_issue vm-collector collector "$RUN/tls-collector"
  tls_issue guest agent "$HOSTDATA/tls-agent"
  host_bg repl-target "$HOST_BIN/tidemark-target" --listen "127.0.0.1:$tport" \
    --data "$RUN/site/data" --token-file "$RUN/token" --tls "$RUN/tls-target"
  wait_port "$tport"
  host_bg repl-collector "$HOST_BIN/tidemark-collector" --listen "127.0.0.1:$cport" \
    --spool "$RUN/site/spool" --target "127.0.0.1:$tport" --api "127.0.0.1:$aport" \
    --token-file "$RUN/token" --tls "$RUN/tls-collector" --spool-cap 1G
  wait_port "$cport"
  wait_port "$aport"
  cmdline collector "10.0.2.2:$cport"
  cmdline api "10.0.2.2:$aport"
  hook_set REPL_API "127.0.0.1:$aport"
  echo "target 127.0.0.1:$tport, collector 127.0.0.1:$cport, api 127.0.0.1:$aport"
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
