#!/usr/bin/env bash
# Runs a command inside a throwaway Linux VM with Soft-RoCE ready, and exits with that
# command's exit code.
#
#   soft-roce/run-in-vm.sh [--memory 2G] [--cpus 2] -- COMMAND [ARGS...]
#
# The VM is QEMU in software emulation (TCG: the build machines' KVM cannot run a Linux guest)
# booted with virtme-ng and Debian's kernel, sharing this machine's root file system read-only,
# so binaries built here run inside unchanged; the current directory is shared writable. Inside:
# rdma_rxe is loaded, a veth pair veth0 (10.77.0.1) / veth1 (10.77.0.2) is up, rxe0 sits on
# veth0 (one rxe device: two in different namespaces do not talk on this kernel), and nested
# KVM is enabled (kvm_amd or kvm_intel on an emulated '-cpu max'), so the rmc VMM runs too,
# slowly. Boot takes 25-40 s.
#
# Needs (Debian): qemu-system-x86 linux-image-amd64 busybox-static rdma-core ibverbs-providers
# ibverbs-utils iproute2, and
# virtme-ng from PyPI (`pip install virtme-ng`, command `vng`).
set -euo pipefail

memory=2G
cpus=2
while [ $# -gt 0 ]; do
    case "$1" in
    --memory) memory=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
    esac
done
[ $# -gt 0 ] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

die() { echo "run-in-vm.sh: $*" >&2; exit 125; }
command -v vng >/dev/null || die "virtme-ng is missing: pip install virtme-ng"
command -v qemu-system-x86_64 >/dev/null || die "QEMU is missing: apt-get install qemu-system-x86"
kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || die "no kernel in /boot: apt-get install linux-image-amd64"
ver=${kernel#/boot/vmlinuz-}
[ -d "/lib/modules/$ver/kernel/drivers/infiniband/sw/rxe" ] || die "kernel $ver has no rdma_rxe module"

work=$(mktemp -d "$PWD/.rmc-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
printf '%q ' "$@" >"$work/cmd"
cat >"$work/inner.sh" <<INNER
#!/bin/bash
set -e
modprobe rdma_rxe
modprobe kvm_amd nested=1 2>/dev/null || modprobe kvm_intel nested=1 2>/dev/null || true
ip link add veth0 type veth peer name veth1
ip addr add 10.77.0.1/24 dev veth0
ip addr add 10.77.0.2/24 dev veth1
ip link set lo up
ip link set veth0 up
ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0
for i in \$(seq 50); do grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state && break; sleep 0.1; done
ulimit -l unlimited
# Proof of life for the freeze watchdog outside.
( n=0; while :; do n=\$((n + 1)); echo \$n >$work/alive; sleep 5; done ) </dev/null >/dev/null 2>&1 &
cd "$PWD"
set +e
bash -c "\$(cat $work/cmd)"
echo \$? > $work/rc
INNER
chmod +x "$work/inner.sh"
echo "run-in-vm.sh: booting $kernel under TCG with Soft-RoCE ($memory, $cpus CPUs)..." >&2
# Through a pipe: virtme-ng reopens /dev/stdout, which would truncate a log file that our
# stdout points at (losing everything written before); on a pipe that is harmless.
# RMC_VM_CONSOLE=1 shows the guest kernel's console (boot, oopses, lockup reports) as well.
verbose=()
extra=()
[ -n "${RMC_VM_APPEND:-}" ] && extra=(--append "$RMC_VM_APPEND")
[ "${RMC_VM_CONSOLE:-0}" = 1 ] && verbose=(--verbose --append "loglevel=6")
# RMC_VM_QEMU_OPTS: more QEMU options, e.g. '-accel tcg,thread=single' (one host thread for
# all VM CPUs instead of one each).
qemu_opts="-cpu max ${RMC_VM_QEMU_OPTS:-}"
# Watchdog: emulated nested virtualization has been seen to freeze the whole VM (its clock
# stops, QEMU spins); if the VM shows no sign of life for 180 s, stop it and say so.
(
    seen="" since=$(date +%s)
    while sleep 10; do
        [ -e "$work/rc" ] && exit 0
        now=$(cat "$work/alive" 2>/dev/null || true)
        if [ "$now" != "$seen" ]; then
            seen=$now since=$(date +%s)
        elif [ -n "$seen" ] && [ $(($(date +%s) - since)) -gt 180 ]; then
            touch "$work/frozen"
            # QEMU's command line names the script base64-encoded (virtme.exec=...).
            pkill -f -- "$(printf %s "$work/inner.sh" | base64 -w0)" || true
            exit 0
        fi
    done
) &
watchdog=$!
vng -r "$kernel" --disable-kvm --user root --memory "$memory" --cpus "$cpus" "${verbose[@]}" "${extra[@]}" \
    --qemu-opts="$qemu_opts" --rwdir "$PWD" --exec "$work/inner.sh" 2>&1 | cat || true
kill "$watchdog" 2>/dev/null || true
[ -e "$work/frozen" ] && die "the VM froze (no sign of life for 180 s; emulated nested virtualization) and was stopped"
[ -f "$work/rc" ] || die "the command did not run (the VM failed to boot or the setup failed)"
exit "$(cat "$work/rc")"
