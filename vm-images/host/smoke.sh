# shellcheck shell=bash
# Host hook of the smoke test: a nonce the guest must fetch over the
# network from the host (busybox httpd on 127.0.0.1, reached from the
# guest as 10.0.2.2) and also find in /hostdata.

host_before_smoke() {
  local port nonce
  port=$(free_port)
  nonce=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  mkdir -p "$RUN/http"
  printf '%s' "$nonce" >"$RUN/http/nonce"
  printf '%s' "$nonce" >"$HOSTDATA/nonce"
  host_bg smoke-httpd "$B/guestpkgs/bin/busybox" httpd -f -p "127.0.0.1:$port" -h "$RUN/http"
  wait_port "$port"
  cmdline http "10.0.2.2:$port"
  cmdline nonce "$nonce"
}
