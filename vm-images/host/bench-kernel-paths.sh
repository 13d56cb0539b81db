# Host hook of the kernel-path benchmark: its rounds and run time from the
# environment of bench/run-vm-bench.

host_before_bench_kernel_paths() {
  cmdline repeat "${REPEAT:-3}"
  cmdline runtime "${RUNTIME:-8}"
}
