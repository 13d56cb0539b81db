# shellcheck shell=bash
# Host hook of power-loss-ublk: the same checks as power-loss (its state
# directory is under the scratch disk's /power-loss-ublk), without
# replication (power-loss covers the resync after the crash).
# shellcheck source=power-loss.sh
. "$(dirname "${BASH_SOURCE[0]}")/power-loss.sh"

host_before_power_loss_ublk() { host_before_power_loss no-replication; }
host_after_power_loss_ublk() { PL_TEST=power-loss-ublk host_after_power_loss; }
