#!/usr/bin/env bash
# The main job, until the failover demo exists: start the VM (counter service + dirtier), send
# it requests with the consistency check on, show what happened, and clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
rmc=target/release/rmc
log=$(mktemp)
trap 'kill "$vm" 2>/dev/null || true; wait "$vm" 2>/dev/null || true; rm -f "$log"' EXIT

echo "== rmc run: 256 MiB guest, vCPU0 = counter service, vCPU1 = dirtier (10,000 pages/s)"
"$rmc" run --listen 127.0.0.1:0 --workload counter,dirtier --duration 4 >"$log" &
vm=$!
for _ in $(seq 100); do
    addr=$(sed -n 's/^rmc: counter service listening on udp //p' "$log")
    [ -n "$addr" ] && break
    kill -0 "$vm" 2>/dev/null || { cat "$log"; echo "demo: the VM did not start" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { echo "demo: the VM never said where it listens" >&2; exit 1; }
cat "$log"

echo "== rmc client: 20 requests, each 5th sent twice, replies checked"
"$rmc" client --server "$addr" -n 20 --repeat-every 5 --check --exclusive
echo "== rmc client: a second client, 200 requests (quiet)"
"$rmc" client --server "$addr" -n 200 --check --quiet
wait "$vm"
vm=
tail -n 1 "$log"
