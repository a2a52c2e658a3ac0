#!/usr/bin/env bash
# Boot check of an initramfs from guest-linux/build-initramfs.sh (service seq): boots Debian's
# kernel with it under QEMU + KVM and passes (exit 0) once the console shows
# "rmc-guest: init up" and then "seq 1" .. "seq N" in order without a gap; fails (exit 1) on a
# gap, a timeout or QEMU exiting first. Prints the time from QEMU's start to "init up" and the
# measured seq interval.
#
#   guest-linux/check-image.sh [--vm] [--count N] [--timeout S] [--kernel PATH]
#                              [--append 'ARGS'] [--log FILE] IMAGE
#
#   --vm            run the check inside the Soft-RoCE VM (soft-roce/run-in-vm.sh: QEMU TCG with
#                   nested KVM); needed on the build machines, whose KVM cannot boot a stock
#                   kernel. Without it the check runs QEMU right here (e.g. inside that VM).
#   --count N       seq lines to wait for (default 20)
#   --timeout S     give up S seconds after QEMU starts (default 360: the nested boot takes
#                   80-90 s, and over 180 s while another VM or a build shares the 2 cores)
#   --kernel PATH   default: the newest /boot/vmlinuz-*
#   --append ARGS   more kernel parameters after "console=ttyS0 panic=1"
#   --log FILE      also write the console, each line prefixed by seconds since QEMU started
#
# With --vm, keep IMAGE and the log file under the current directory: the VM sees this machine's
# root file system read-only but has its own /tmp, and only the current directory is writable.
#
# The QEMU command: qemu-system-x86_64 -enable-kvm -M pc -cpu host -m 512 -smp 2 -nographic
#   -no-reboot -kernel KERNEL -initrd IMAGE -append 'console=ttyS0 panic=1'
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "check-image.sh: FAIL: $*" >&2; exit 1; }

vm=0 count=20 timeout=360 kernel="" append="" log="" image=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --vm) vm=1; shift ;;
    --count) count=$2; args+=("$1" "$2"); shift 2 ;;
    --timeout) timeout=$2; args+=("$1" "$2"); shift 2 ;;
    --kernel) kernel=$(realpath "$2"); args+=("$1" "$kernel"); shift 2 ;;
    --append) append=$2; args+=("$1" "$2"); shift 2 ;;
    --log) log=$(realpath -m "$2"); args+=("$1" "$log"); shift 2 ;;
    -*) echo "check-image.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    *) [ -z "$image" ] || { usage >&2; exit 2; }; image=$1; shift ;;
    esac
done
[ -n "$image" ] || { usage >&2; exit 2; }
[ -f "$image" ] || fail "no image $image"
image=$(realpath "$image")
[[ $count =~ ^[1-9][0-9]*$ ]] || fail "--count wants a positive number"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || fail "--timeout wants a positive number of seconds"

if [ "$vm" = 1 ]; then
    # The VM shares this file system (read-only, but for the current directory).
    set +e
    "$here/../soft-roce/run-in-vm.sh" -- "$here/check-image.sh" "${args[@]}" "$image"
    rc=$?
    set -e
    [ "$rc" -le 1 ] || fail "the Soft-RoCE VM failed (run-in-vm.sh exit $rc)"
    exit "$rc"
fi

if [ -z "$kernel" ]; then
    kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$kernel" ] || fail "no kernel in /boot (apt-get install linux-image-amd64)"
fi
command -v qemu-system-x86_64 >/dev/null || fail "QEMU is missing (apt-get install qemu-system-x86)"
[ -c /dev/kvm ] || fail "no /dev/kvm here: use --vm to run the check in the Soft-RoCE VM"
grep -q virtme /proc/cmdline 2>/dev/null ||
    echo "check-image.sh: note: not inside the Soft-RoCE VM; if this KVM cannot boot a stock kernel, use --vm" >&2

tmp=$(mktemp -d)
qpid=""
cleanup() {
    [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
mkfifo "$tmp/console"
[ -z "$log" ] || : >"$log"

cmdline="console=ttyS0 panic=1${append:+ $append}"
echo "check-image.sh: booting $kernel with $image (KVM; cmdline '$cmdline'; want seq 1..$count)" >&2
start=$EPOCHREALTIME
qemu-system-x86_64 -enable-kvm -M pc -cpu host -m 512 -smp 2 -nographic -no-reboot \
    -kernel "$kernel" -initrd "$image" -append "$cmdline" </dev/null >"$tmp/console" 2>&1 &
qpid=$!
exec 4<"$tmp/console"

# Seconds (float) since $start; no fork.
since() { awk -v a="$start" -v b="$1" 'BEGIN { printf "%.3f", b - a }'; }
deadline=$((${start%.*} + timeout))
t_init="" next=1 times=() tail_lines=()
result=""
while :; do
    left=$((deadline - ${EPOCHREALTIME%.*}))
    if [ "$left" -le 0 ]; then result="timeout"; break; fi
    rc=0
    IFS= read -r -t "$left" line <&4 || rc=$?
    if [ "$rc" -gt 128 ]; then result="timeout"; break; fi
    if [ "$rc" -ne 0 ] && [ -z "$line" ]; then result="qemu-exit"; break; fi
    now=$EPOCHREALTIME
    line=${line%$'\r'}
    [ -z "$log" ] || printf '%s %s\n' "$now" "$line" >>"$log.raw"
    tail_lines+=("$line")
    [ ${#tail_lines[@]} -le 40 ] || tail_lines=("${tail_lines[@]:1}")
    if [ -z "$t_init" ]; then
        [[ $line == *"rmc-guest: init up"* ]] && t_init=$now
        continue
    fi
    if [[ $line =~ (^|[^[:alnum:]_])seq\ ([0-9]+)$ ]]; then
        n=${BASH_REMATCH[2]}
        if [ "$n" != "$next" ]; then result="gap: got 'seq $n' where 'seq $next' was due"; break; fi
        times+=("$now")
        next=$((next + 1))
        if [ "$next" -gt "$count" ]; then result="ok"; break; fi
    fi
done

if [ -n "$log" ] && [ -f "$log.raw" ]; then
    awk -v s="$start" '{ t = $1; sub(/^[^ ]* /, ""); printf "%8.3f | %s\n", t - s, $0 }' "$log.raw" >"$log"
    rm -f "$log.raw"
fi
show_tail() {
    echo "check-image.sh: last console lines:" >&2
    printf '  | %s\n' "${tail_lines[@]}" >&2
}
case "$result" in
ok) ;;
timeout)
    show_tail
    if [ -z "$t_init" ]; then fail "no 'rmc-guest: init up' within $timeout s"; fi
    fail "init up after $(since "$t_init") s, but only seq 1..$((next - 1)) of $count within $timeout s" ;;
qemu-exit)
    show_tail
    fail "QEMU exited before the check passed (init up: ${t_init:+yes}${t_init:-no}, seq up to $((next - 1)))" ;;
*) show_tail; fail "$result" ;;
esac

intervals=$(printf '%s\n' "${times[@]}" | awk '
    NR > 1 { d = ($1 - p) * 1000; s += d; if (min == "" || d < min) min = d; if (d > max) max = d }
    { p = $1 }
    END { if (NR > 1) printf "mean %.1f ms, min %.1f, max %.1f over %d intervals", s / (NR - 1), min, max, NR - 1 }')
echo "check-image.sh: PASS: init up $(since "$t_init") s after QEMU start; seq 1..$count in order, $(since "${times[-1]}") s; seq interval ${intervals:-n/a}"
