#!/usr/bin/env bash
# Checks, inside the Soft-RoCE VM (run-in-vm.sh), everything rmc's RDMA tests stand on: an
# RDMA device rmc can use, the verbs library seeing it, RDMA WRITE between two processes on
# it (perftest, rdma_cm), and KVM for the rmc VMM. Exits non-zero naming the first failure.
set -uo pipefail
rmc=${1:?usage: smoke.sh PATH/TO/rmc}
fail() { echo "soft-roce smoke: FAILED: $*" >&2; exit 1; }

"$rmc" devices | tee /tmp/devices.txt
grep -q "usable by rmc" /tmp/devices.txt || fail "rmc devices finds no usable RDMA port"
grep -q "local address 10.77.0.1" /tmp/devices.txt || fail "no RoCE v2 GID for 10.77.0.1"
ibv_devices 2>/dev/null | grep -q rxe0 || fail "libibverbs does not see rxe0 (ibverbs-providers installed?)"

# RDMA WRITE, rdma_cm connection setup, 64 KiB messages, loopback on rxe0. perftest under
# emulation occasionally stalls after connecting; one retry on another port, with a note.
bw() {
    local port=$1
    ib_write_bw -R -d rxe0 -s 65536 -n 200 -p "$port" >/tmp/bw-server.txt 2>&1 &
    local server=$!
    sleep 2
    if timeout 60 ib_write_bw -R -d rxe0 -s 65536 -n 200 -p "$port" 10.77.0.1 >/tmp/bw-client.txt 2>&1 \
        && wait "$server"; then
        return 0
    fi
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    return 1
}
if ! bw 18515; then
    echo "soft-roce smoke: ib_write_bw stalled or failed once; retrying on another port:" >&2
    tail -n 3 /tmp/bw-client.txt >&2
    bw 18600 || { cat /tmp/bw-client.txt; fail "ib_write_bw (RDMA WRITE over rdma_cm) did not complete"; }
fi
grep -E "^ *65536" /tmp/bw-client.txt | tail -n 1 | sed 's/^/ib_write_bw 64 KiB (TCG-emulated, ratios only): /'

[ -e /dev/kvm ] || fail "no /dev/kvm inside the VM (nested KVM)"
timeout 120 "$rmc" run --memory 32M --workload counter,dirtier --listen 127.0.0.1:0 \
    --duration 1 --log warn >/tmp/run.txt 2>&1 || { cat /tmp/run.txt; fail "the rmc VMM does not run under nested KVM"; }
echo "soft-roce smoke: ok"
