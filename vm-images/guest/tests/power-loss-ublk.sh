# power-loss-ublk: the power-loss test (power-loss.sh) with the disk used
# through the agent's ublk front end (/dev/ublkbN) instead of the kernel NBD
# client: the host kill -9s qemu right after a FLUSH on /dev/ublkbN was
# acknowledged, and host/power-loss-ublk.sh checks the images.
# Must be the last test of its boot (suites/power-loss-ublk).
# timeout: 180
PL_FRONT=ublk
. /tm/tests/power-loss.sh
