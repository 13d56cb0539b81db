# Helpers for guest tests (busybox sh; sourced by /tm/run-test before the
# test, which runs with `set -e` and `set -x`).
#
# Environment:
#   TM_TEST      the test's name
#   TM_WORK      its work directory (tmpfs); *.log files there are shown when it fails
#   TM_SCRATCH   its directory on the scratch disk (ext4, /scratch), e.g. for agent state
#   TM_OUT       files put here come back to the host (build/logs/<run>/<suite>/out/<test>/)
#   TM_<KEY>     every tidemark.<key>=<value> of the kernel command line (key upper-cased,
#                . and - turned into _), e.g. TM_COLLECTOR from tidemark.collector=
#   /hostdata/   files the host's hooks put in the run's hostdata/ directory
#   /dev/disk/<name>  the virtio disks, by the name (serial) the host gave them
#
# Everything a test starts with these helpers (agents, NBD devices, mounts)
# is undone when it ends, whether it passed, failed or timed out.

HOST_IP=10.0.2.2

log() { echo "[$TM_TEST] $*"; }

# fail REASON: stop the test; REASON is what the FAIL line shows.
fail() {
  echo "$*" >"$TM_WORK/.reason"
  echo "FAIL: $*"
  exit 1
}

# check DESCRIPTION COMMAND...: run COMMAND; fail with DESCRIPTION if it fails.
check() {
  _d=$1; shift
  "$@" || fail "$_d"
}

# assert_eq GOT WANT [WHAT]
assert_eq() {
  [ "$1" = "$2" ] || fail "${3:-value}: got '$1', want '$2'"
}

# now: seconds since boot (fractional).
now() { cut -d' ' -f1 /proc/uptime; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s; fail
# with DESCRIPTION if it has not succeeded after SECONDS.
wait_until() {
  _limit=$1 _what=$2; shift 2
  _end=$(awk -v t="$(now)" -v l="$_limit" 'BEGIN { print t + l }')
  until "$@"; do
    if awk -v t="$(now)" -v e="$_end" 'BEGIN { exit !(t > e) }'; then
      fail "timed out after ${_limit}s waiting for $_what"
    fi
    sleep 0.1
  done
}

# disk NAME: the block device the host attached as NAME (e.g. /dev/vda).
disk() {
  [ -b "/dev/disk/$1" ] || fail "no disk named $1 (declare it with 'disk $1 SIZE' in the suite file)"
  readlink -f "/dev/disk/$1"
}

# block_size DEV: size in bytes.
block_size() { blockdev --getsize64 "$1"; }

# http_get HOST:PORT PATH: the body of an HTTP GET (busybox nc; busybox
# wget crashes in this static build).
http_get() {
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "${1%:*}" |
    nc -w 10 "${1%:*}" "${1##*:}" >"$TM_WORK/.http" || return 1
  head -n1 "$TM_WORK/.http" | grep -q ' 200 ' || return 1
  sed '1,/^\r*$/d' "$TM_WORK/.http"
}

# --- the agent -------------------------------------------------------------

agent_sock() { echo "/run/tm-$1.sock"; }
agent_state() { echo "$TM_SCRATCH/$1.state"; }
agent_log() { echo "$TM_WORK/agent-$1.log"; }

# start_agent ID DISK [EXTRA ARGS...]: `tidemark-agent protect` DISK as disk
# id ID, state in $(agent_state ID), NBD on unix:$(agent_sock ID), log in
# $(agent_log ID). Waits (30 s at most) until it serves. Must not be called
# in $(...): the agent is a child of the test's shell. Sets AGENT_PID,
# AGENT_SOCK, AGENT_STATE.
start_agent() {
  _id=$1 _disk=$2; shift 2
  AGENT_SOCK=$(agent_sock "$_id")
  AGENT_STATE=$(agent_state "$_id")
  rm -f "$AGENT_SOCK"
  tidemark-agent protect --disk "$_disk" --state "$AGENT_STATE" --disk-id "$_id" \
    --listen "unix:$AGENT_SOCK" "$@" >>"$(agent_log "$_id")" 2>&1 &
  AGENT_PID=$!
  echo "$AGENT_PID" >"$TM_WORK/agent-$_id.pid"
  _i=0
  while [ ! -S "$AGENT_SOCK" ]; do
    kill -0 "$AGENT_PID" 2>/dev/null ||
      fail "agent $_id exited at start: $(tail -n 3 "$(agent_log "$_id")" | tr '\n' ' ')"
    _i=$((_i + 1))
    [ $_i -le 300 ] || fail "agent $_id did not serve within 30 s"
    sleep 0.1
  done
  log "agent $_id (pid $AGENT_PID) serves $_disk on $AGENT_SOCK"
}

# stop_agent ID: SIGTERM, and check it stops cleanly (exit 0) within 60 s.
stop_agent() {
  _pid=$(cat "$TM_WORK/agent-$1.pid")
  kill -TERM "$_pid" 2>/dev/null || fail "agent $1 (pid $_pid) is not running"
  _i=0
  while kill -0 "$_pid" 2>/dev/null; do
    _i=$((_i + 1))
    [ $_i -le 600 ] || fail "agent $1 did not stop within 60 s of SIGTERM"
    sleep 0.1
  done
  _rc=0
  wait "$_pid" || _rc=$?
  rm -f "$TM_WORK/agent-$1.pid"
  [ "$_rc" = 0 ] || fail "agent $1 exited with status $_rc after SIGTERM"
  log "agent $1 stopped cleanly"
}

# agent_status ID: `tidemark agent-status --json` of a running agent.
agent_status() { tidemark agent-status --agent "$(agent_state "$1")" --json; }

# json_num KEY: the number (or true/false/null) under KEY in the one-line
# JSON object on stdin.
json_num() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" | head -n1; }

# json_str KEY: the string under KEY.
json_str() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" | head -n1; }

# --- the kernel NBD client ----------------------------------------------------

# nbd_free: the first /dev/nbdN not connected.
nbd_free() {
  for _n in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
    [ -b "/dev/nbd$_n" ] || continue
    [ -e "/sys/block/nbd$_n/pid" ] && continue
    echo "/dev/nbd$_n"
    return 0
  done
  fail "no free /dev/nbdN"
}

_nbd_ready() { [ "$(blockdev --getsize64 "$1" 2>/dev/null || echo 0)" -gt 0 ]; }

# nbd_connect SOCK [DEV]: connect the kernel's NBD client (nbd-client,
# netlink) to the NBD server on unix socket SOCK; prints the device.
nbd_connect() {
  _sock=$1 _dev=${2:-$(nbd_free)}
  nbd-client -unix "$_sock" "$_dev" -b 4096 -t 60 >>"$TM_WORK/nbd-client.log" 2>&1 ||
    fail "nbd-client $_sock $_dev failed: $(tail -n 2 "$TM_WORK/nbd-client.log" | tr '\n' ' ')"
  echo "$_dev" >>"$TM_WORK/.nbd"
  wait_until 10 "$_dev to get a size" _nbd_ready "$_dev"
  echo "$_dev"
}

# nbd_disconnect DEV
nbd_disconnect() {
  nbd-client -d "$1" >>"$TM_WORK/nbd-client.log" 2>&1 || fail "nbd-client -d $1 failed"
  wait_until 10 "$1 to disconnect" eval "[ ! -e /sys/block/${1#/dev/}/pid ]"
  if [ -f "$TM_WORK/.nbd" ]; then
    grep -vx "$1" "$TM_WORK/.nbd" >"$TM_WORK/.nbd.new" || true
    mv "$TM_WORK/.nbd.new" "$TM_WORK/.nbd"
  fi
}

# --- filesystems -----------------------------------------------------------------

# mount_fs DEV DIR [MOUNT OPTIONS...]
mount_fs() {
  _dev=$1 _dir=$2; shift 2
  mkdir -p "$_dir"
  mount "$@" "$_dev" "$_dir" || fail "mount $_dev on $_dir failed"
  echo "$_dir" >>"$TM_WORK/.mounts"
}

# umount_fs DIR
umount_fs() {
  umount "$1" || fail "umount $1 failed"
  if [ -f "$TM_WORK/.mounts" ]; then
    grep -vx "$1" "$TM_WORK/.mounts" >"$TM_WORK/.mounts.new" || true
    mv "$TM_WORK/.mounts.new" "$TM_WORK/.mounts"
  fi
}

# --- data ----------------------------------------------------------------------

# write_files DIR: DIR/after/f0..f15 (64 KiB to 1 MiB of random bytes) and
# DIR/after/big (12 MiB).
write_files() {
  mkdir "$1/after"
  _i=0
  while [ $_i -lt 16 ]; do
    dd if=/dev/urandom of="$1/after/f$_i" bs=64k count=$((_i + 1)) 2>/dev/null
    _i=$((_i + 1))
  done
  dd if=/dev/urandom of="$1/after/big" bs=1M count=12 2>/dev/null
}

# sum_files DIR: the sha256 of every file below DIR, into $TM_WORK/sums
# (check later with: (cd DIR && sha256sum -c -s "$TM_WORK/sums")).
sum_files() { (cd "$1" && find . -type f | sort | xargs sha256sum) >"$TM_WORK/sums"; }

# pattern_block TAG N: 4096 bytes that name TAG and N (the host's hooks
# make the same bytes with the same command).
pattern_block() { yes "tidemark-$1-block-$(printf %06d "$2")" | head -c 4096; }

# export_file FILE [NAME]: hand FILE back to the host (build/logs/.../out/<test>/).
export_file() { cp "$1" "$TM_OUT/${2:-${1##*/}}"; }

# console MESSAGE: a line straight to the console, for the host to act on
# at once (vm-images/run-tests can kill qemu on a marker).
console() { echo "$*" >/dev/console; }

# --- cleanup (run when the test ends; also after a timeout) -------------------------
tm_cleanup() {
  set +e +x
  if [ -f "$TM_WORK/.mounts" ]; then
    for _d in $(sed '1!G;h;$!d' "$TM_WORK/.mounts"); do umount "$_d" 2>/dev/null || umount -l "$_d" 2>/dev/null; done
    rm -f "$TM_WORK/.mounts"
  fi
  if [ -f "$TM_WORK/.nbd" ]; then
    for _d in $(cat "$TM_WORK/.nbd"); do nbd-client -d "$_d" >/dev/null 2>&1; done
    rm -f "$TM_WORK/.nbd"
  fi
  for _p in "$TM_WORK"/agent-*.pid; do
    [ -f "$_p" ] || continue
    _pid=$(cat "$_p")
    kill -TERM "$_pid" 2>/dev/null
    _i=0
    while kill -0 "$_pid" 2>/dev/null && [ $_i -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    kill -KILL "$_pid" 2>/dev/null
    rm -f "$_p"
  done
  return 0
}

# --- the ublk front end -------------------------------------------------------------

# _ublk_live LOG N: the log has more than N "ublk device live" lines.
_ublk_live() { [ "$(grep -c 'ublk device live' "$1" 2>/dev/null || true)" -gt "$2" ]; }

# start_ublk_agent ID DISK [EXTRA ARGS...]: `tidemark-agent protect --ublk`
# (no NBD) for DISK as disk id ID, state in $(agent_state ID). Waits (60 s
# at most) until the device is live. Sets AGENT_PID, AGENT_STATE, UBLK_DEV
# (/dev/ublkbN). Not in $(...).
start_ublk_agent() {
  _id=$1 _disk=$2; shift 2
  AGENT_STATE=$(agent_state "$_id")
  _log=$(agent_log "$_id")
  _seen=$(grep -c 'ublk device live' "$_log" 2>/dev/null || true)
  tidemark-agent protect --disk "$_disk" --state "$AGENT_STATE" --disk-id "$_id" --ublk "$@" >>"$_log" 2>&1 &
  AGENT_PID=$!
  echo "$AGENT_PID" >"$TM_WORK/agent-$_id.pid"
  _i=0
  until _ublk_live "$_log" "${_seen:-0}"; do
    kill -0 "$AGENT_PID" 2>/dev/null ||
      fail "agent $_id exited at start: $(tail -n 3 "$_log" | tr '\n' ' ')"
    _i=$((_i + 1))
    [ $_i -le 600 ] || fail "agent $_id: no ublk device within 60 s"
    sleep 0.1
  done
  UBLK_DEV=$(grep 'ublk device live' "$_log" | tail -n1 | sed -n 's/.*device=\(\/dev\/ublkb[0-9]*\).*/\1/p')
  [ -b "$UBLK_DEV" ] || fail "agent $_id says ${UBLK_DEV:-its device} is live, but it is no block device"
  log "agent $_id (pid $AGENT_PID) serves $_disk as $UBLK_DEV"
}

# kill9_agent ID: kill -9 (no cleanup of any kind), and reap it.
kill9_agent() {
  _pid=$(cat "$TM_WORK/agent-$1.pid")
  kill -KILL "$_pid" 2>/dev/null || fail "agent $1 (pid $_pid) is not running"
  wait "$_pid" 2>/dev/null || true
  rm -f "$TM_WORK/agent-$1.pid"
  log "agent $1 (pid $_pid) killed with SIGKILL"
}

# The host's collector API is HTTPS with the identity of the CA whose
# ca.pem comes with the agent's identity.
if [ -f /hostdata/tls-agent/ca.pem ]; then
  export TIDEMARK_API_CA=/hostdata/tls-agent/ca.pem
fi
