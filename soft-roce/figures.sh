#!/usr/bin/env bash
# RDMA figures, all in one boot of the Soft-RoCE VM (software-emulated: only the ratios mean
# anything). Run as:
#
#   soft-roce/run-in-vm.sh --cpus 1 -- soft-roce/figures.sh target/release/rmc
#
# Raw outputs and the summary go to docs/rdma-figures/ (FIGURES_OUT to change; the VM's own
# /tmp does not survive it).
# 1. ib_write_bw (perftest, rdma_cm) on rxe0 with messages of an epoch's size, against
#    rmc's raw RDMA WRITE stream and its checkpoint transmit rate (rmc bench, host dirtier);
# 2. ib_write_lat with a 1,000-page epoch's size, beside rmc's write + commit-to-ack of a
#    1,000-page epoch;
# 3. RDMA against TCP in this VM (rmc bench --transport tcp,rdma).
set -uo pipefail
rmc=${1:?usage: figures.sh PATH/TO/rmc}
out=${FIGURES_OUT:-$PWD/docs/rdma-figures}
mkdir -p "$out"
fail() { echo "figures: FAILED: $*" >&2; exit 1; }
size=$((1000 * 4104))   # 1,000 pages with their index entries

perf() {   # perf NAME TOOL ARGS...: server and client of a perftest tool on rxe0
    local name=$1 tool=$2
    shift 2
    "$tool" -R -d rxe0 "$@" >"$out/$name-server.txt" 2>&1 &
    local server=$!
    sleep 2
    timeout 300 "$tool" -R -d rxe0 "$@" 10.77.0.1 >"$out/$name.txt" 2>&1 || fail "$tool $*"
    wait "$server"
}
perf bw ib_write_bw -s "$size" -n 100
perf lat ib_write_lat -s "$size" -n 50

timeout 1200 "$rmc" --log warn bench --memory 128M --dirty-source host --dirty-pages 1000,10000 \
    --epoch-ms 0 --transport tcp,rdma --seconds 5 --heartbeat-ms 200 --heartbeat-misses 25 \
    --json >"$out/bench.json" || fail "rmc bench"

python3 - "$out" "$size" <<'PY' | tee "$out/summary.txt"
import json, re, sys
out, size = sys.argv[1], int(sys.argv[2])
def last_row(path, cols):
    rows = [l.split() for l in open(path) if re.match(r"^\s*\d+\s", l)]
    return rows[-1] if rows else None
bw = last_row(f"{out}/bw.txt", 0)      # bytes iterations BW_peak BW_average MsgRate
lat = last_row(f"{out}/lat.txt", 0)    # bytes iters t_min t_max t_typical t_avg t_stdev 99% 99.9%
ib_bw = float(bw[3]) * 1e6 / 8 * 1e3 if False else float(bw[3]) * 1024 * 1024  # MB/s (MiB) -> B/s
ib_lat_us = float(lat[4])
rows = json.load(open(f"{out}/bench.json"))["rows"]
def row(t, n):
    return next(r for r in rows if r["transport"] == t and r["dirty_pages"] == n)
print(f"ib_write_bw, {size}-byte messages: {ib_bw/1e6:.1f} MB/s")
print(f"ib_write_lat, {size} bytes: typical {ib_lat_us:.0f} us")
for n in (1000, 10000):
    r, t = row("rdma", n), row("tcp", n)
    print(f"{n} pages/epoch: rdma raw WRITE stream {r['raw_bytes_per_s']/1e6:.1f} MB/s "
          f"({r['raw_bytes_per_s']/ib_bw:.0%} of ib_write_bw); checkpoint transmit "
          f"{r['transmit_bytes_per_s']/1e6:.1f} MB/s ({r['transmit_bytes_per_s']/ib_bw:.0%} of ib_write_bw); "
          f"checkpoints {r['bytes_per_s']/1e6:.1f} MB/s")
    print(f"   tcp: transmit {t['transmit_bytes_per_s']/1e6:.1f} MB/s, checkpoints {t['bytes_per_s']/1e6:.1f} MB/s, "
          f"ckpt/s {t['checkpoints_per_s']:.1f} vs rdma {r['checkpoints_per_s']:.1f}; "
          f"end-to-end p50 tcp {t['phases']['end_to_end']['p50']} us, rdma {r['phases']['end_to_end']['p50']} us")
r = row("rdma", 1000)
commit = r["phases"]["transmit"]["p50"] + r["phases"]["commit_to_ack"]["p50"]
print(f"1,000-page epoch: rmc write + commit-to-ack p50 {commit} us beside ib_write_lat {ib_lat_us:.0f} us "
      f"(ratio {commit/ib_lat_us:.2f})")
PY
