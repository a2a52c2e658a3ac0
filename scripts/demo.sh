#!/usr/bin/env bash
# The main job, until the failover demo exists (issue 4): a standby and a protected primary on
# this machine (TCP loopback), clients talking to the guest's service with the consistency
# check on, then what each side saw. Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rmc=target/release/rmc
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Waits until file $1 has a line starting with $2; prints the rest of that line.
wait_line() {
    for _ in $(seq 200); do
        local v
        v=$(sed -n "s/^$2//p" "$1" | head -n 1)
        if [ -n "$v" ]; then echo "$v"; return 0; fi
        sleep 0.05
    done
    echo "demo: timed out waiting for '$2' in $1:" >&2
    cat "$1" >&2
    return 1
}

head -c 32 /dev/urandom | base64 >"$work/secret"

echo "== rmc standby: waits for the primary, keeps a backup of its VM"
"$rmc" standby --listen 127.0.0.1:0 --secret-file "$work/secret" --sessions 1 --log warn >"$work/standby.log" &
pids+=($!)
standby=$(wait_line "$work/standby.log" "rmc: standby listening on tcp ")
echo "standby on $standby"

echo "== rmc primary: 256 MiB guest, vCPU0 = counter service, vCPU1 = dirtier (10,000 pages/s),"
echo "   checkpointed every 20 ms to the standby for 6 s"
"$rmc" primary --standby "$standby" --secret-file "$work/secret" --listen 127.0.0.1:0 \
    --workload counter,dirtier --duration 6 --summary-interval 2 >"$work/primary.log" &
primary=$!
pids+=("$primary")
addr=$(wait_line "$work/primary.log" "rmc: counter service listening on udp ")
wait_line "$work/primary.log" "rmc: protected by the standby at " >/dev/null
cat "$work/primary.log"

echo "== rmc client: 20 requests, each 5th sent twice, replies checked"
"$rmc" client --server "$addr" -n 20 --repeat-every 5 --check --exclusive
echo "== rmc client: a second client, 500 requests (quiet)"
"$rmc" client --server "$addr" -n 500 --check --quiet

wait "$primary"
echo "== the primary's figures"
tail -n 1 "$work/primary.log"
wait "${pids[0]}"
echo "== the standby's view"
tail -n 1 "$work/standby.log"
