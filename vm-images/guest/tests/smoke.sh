# smoke: the VM is fit for the other tests — kernel modules loaded, the
# ublk and NBD device nodes there, the disks named, the network reaching
# the host (a nonce served by the host's hook over HTTP on 127.0.0.1), and
# the musl binaries running on the qemu64 CPU.
# timeout: 60

for m in ublk_drv nbd virtio_blk virtio_net loop; do
  grep -q "^$m " /proc/modules || fail "module $m is not loaded"
done
grep -qw ext4 /proc/filesystems || fail "no ext4 in /proc/filesystems"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
[ -b /dev/nbd0 ] || fail "/dev/nbd0 missing"
[ -c /dev/loop-control ] || fail "/dev/loop-control missing"
for d in $(echo "$TM_DISKS" | tr ',' ' '); do
  [ -b "/dev/disk/$d" ] || fail "disk $d missing"
done
log "disks: $(ls /dev/disk | tr '\n' ' ')"

ip -4 addr show eth0 | grep -q 'inet 10\.0\.2\.15/24' || fail "eth0 has no 10.0.2.15/24"
[ -n "${TM_HTTP:-}" ] || fail "no tidemark.http= on the kernel command line (host hook missing?)"
got=$(http_get "$TM_HTTP" /nonce) || fail "cannot fetch http://$TM_HTTP/nonce from the host"
assert_eq "$got" "$TM_NONCE" "nonce served by the host"
[ "$(cat /hostdata/nonce)" = "$TM_NONCE" ] || fail "/hostdata/nonce differs from the command line's"

tidemark-agent --version
tidemark --version
command -v mkfs.ext4 e2fsck nbd-client >/dev/null || fail "a guest tool is missing"
if command -v fio >/dev/null; then fio --version || fail "fio does not run"; else log "fio: not available"; fi
echo "smoke test output" >"$TM_OUT/hello.txt"
