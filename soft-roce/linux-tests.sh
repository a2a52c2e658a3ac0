#!/usr/bin/env bash
# rmc's Linux-guest tests. Run inside the Soft-RoCE VM (soft-roce/run-in-vm.sh), where nested
# KVM runs a stock kernel (the build machines' own KVM cannot):
#
#   soft-roce/run-in-vm.sh --cpus 2 -- soft-roce/linux-tests.sh RMC SEQ_IMAGE SHELL_IMAGE
#
# Two VM CPUs: with one, the VM running a 2-vCPU Linux guest showed no sign of life for 180 s
# and was stopped by run-in-vm.sh's watchdog (during the trials, and once during the boot).
#
# RMC is the rmc binary; the images come from guest-linux/build-initramfs.sh (SEQ_IMAGE with
# --service seq, SHELL_IMAGE with a --run that reports the CPUs online). The kernel is the
# newest /boot/vmlinuz-* (Debian's stock kernel). Steps:
#   1. `rmc run --kernel` with 2 vCPUs boots to the shell prompt on the serial console, both
#      CPUs online, the KVM clock as its clocksource;
#   2. `rmc demo --guest linux --transport tcp --trials 5`: real `rmc standby` / `rmc primary`
#      processes protect the guest whose init prints `seq N` every 50 ms; the primary is
#      SIGKILLed at a different moment each trial; the standby restores the VM (a fresh VMM
#      on its backup) and the console a user saw reads seq 1, 2, ... with none repeated or
#      skipped;
#   3. the same over RDMA.
# With --boot-only, step 1 alone. Not in `make test` yet: in this emulated VM a vCPU of the
# protected 2-vCPU guest has triple-faulted now and then, and the VM has stalled past
# run-in-vm.sh's watchdog (docs/DEVELOPING.md, Known limits); run it by hand.
# The primary reads the dirty log only while the guest is paused (--live-dirty-reads off):
# under this emulated nested KVM, reading it while a Linux guest runs makes the guest
# triple-fault (docs/DEVELOPING.md).
set -uo pipefail
boot_only=""
if [ "${1:-}" = "--boot-only" ]; then boot_only=yes; shift; fi
rmc=${1:?usage: linux-tests.sh [--boot-only] RMC SEQ_IMAGE SHELL_IMAGE}
seq_image=${2:?missing the seq image}
shell_image=${3:?missing the shell image}
fail() { echo "linux tests: FAILED: $*" >&2; exit 1; }
kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || fail "no kernel in /boot"
[ -c /dev/kvm ] || fail "no /dev/kvm in the VM (nested KVM)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "linux tests: == boot to the shell prompt (2 vCPUs, $kernel)"
start=$(date +%s%N)
"$rmc" --log warn run --kernel "$kernel" --initrd "$shell_image" --vcpus 2 --memory 256M \
    --listen 127.0.0.1:0 --console "$work/console" >"$work/run.log" 2>&1 &
pid=$!
prompt=""
for _ in $(seq 3000); do
    if grep -q "rmc-guest# " "$work/console" 2>/dev/null; then prompt=yes; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
took=$((($(date +%s%N) - start) / 1000000))
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
if [ -z "$prompt" ]; then
    tail -n 20 "$work/console" "$work/run.log" >&2
    fail "no shell prompt on the serial console within 300 s"
fi
# The kernel's own line (the service's echo can be lost when its session's tty hangs up
# before the UART drained it, on a slow emulated CPU).
grep -q "smp: Brought up 1 node, 2 CPUs" "$work/console" || {
    grep -i "smp\|cpu" "$work/console" | tail -n 20 >&2
    fail "the guest did not bring up 2 CPUs"
}
grep -q "clocksource: Switched to clocksource kvm-clock" "$work/console" || {
    grep -i "clocksource\|kvm" "$work/console" >&2
    fail "the guest does not run on the KVM clock"
}
echo "linux tests: shell prompt after $took ms, 2 CPUs online, clocksource kvm-clock"
grep -m1 "MPTABLE\|Linux version" "$work/console" || true

if [ -n "$boot_only" ]; then
    echo "linux tests: ok (boot only)"
    exit 0
fi

for transport in tcp rdma; do
    echo "linux tests: == rmc demo --guest linux --transport $transport --trials 5"
    timeout 2400 "$rmc" --log warn demo --guest linux --kernel "$kernel" --initrd "$seq_image" \
        --transport "$transport" --trials 5 --kill-after 2 --memory 256M --vcpus 2 \
        --heartbeat-ms 500 --heartbeat-misses 20 --live-dirty-reads off 2>&1 | tee "$work/demo"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || fail "rmc demo --guest linux --transport $transport (exit $rc)"
    n=$(grep -c "none repeated or skipped" "$work/demo")
    [ "$n" -eq 5 ] || fail "rmc demo --guest linux --transport $transport: $n consistent trials, not 5"
    grep -q "over $transport\|listening on $transport" "$work/demo" ||
        fail "rmc demo --guest linux did not use $transport"
done
echo "linux tests: ok"
