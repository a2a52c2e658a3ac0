#!/usr/bin/env bash
# rmc's RDMA tests. Run inside the Soft-RoCE VM (soft-roce/run-in-vm.sh), as `make test` does:
#
#   soft-roce/run-in-vm.sh -- soft-roce/rdma-tests.sh RMC BAD_INPUT_TEST REPLICATION_TEST
#
# RMC is the rmc binary, the other two the compiled test binaries of mc/tests/bad_input.rs and
# vmm/tests/replication.rs (`cargo test --no-run` builds them; the Makefile finds them). Here a
# missing RDMA device or KVM is a failure, and so is any test that reports itself SKIPPED:
#   1. the environment (smoke.sh: rxe0 usable, libibverbs, ib_write_bw, nested KVM);
#   2. every protocol fault test over RDMA, plus the RDMA-specific ones (disconnect after
#      placing an epoch and before its commit, disconnect while the RDMA WRITEs are in flight,
#      a placement into a slot that does not exist, the queue pair forced into the error state);
#   3. replication over RDMA with a real VM: >= 200 checkpoints, then backup == primary
#      (memory and state) and a VM built on the backup continues the service;
#   4. failover over RDMA, 10 trials: the primary's link is cut (no goodbye) at a different
#      moment each time under client load with output commit; the VM built on the standby's
#      backup answers the client's last request identically and continues.
#   5. replication over RDMA with the guest still writing at the last checkpoint;
#   6. `rmc demo --transport rdma --trials 10`: real `rmc standby` / `rmc primary` processes,
#      the primary SIGKILLed at a random moment under checking clients, 10 times;
#   7. `rmc bench --transport tcp,rdma`: the benchmark's RDMA path, every figure present.
# A step passes only if each test it names is reported passed by name, and the harness counted
# exactly that many passes: a renamed or filtered-out test ("running 0 tests") fails the step.
# Run the VM with one CPU (`run-in-vm.sh --cpus 1`, as `make test` does): with two, emulated
# nested virtualization froze the VM or upset the nested guests now and then (see
# soft-roce/README.md). Everything in this VM is software-emulated (~30x slower than the host),
# so heartbeats are relaxed to seconds and the guests are small.
set -uo pipefail
rmc=${1:?usage: rdma-tests.sh RMC BAD_INPUT_TEST REPLICATION_TEST}
bad_input=${2:?missing the bad_input test binary}
replication=${3:?missing the replication test binary}
here=$(cd "$(dirname "$0")" && pwd)
fail() { echo "rdma tests: FAILED: $*" >&2; exit 1; }

# step NAME COMMAND...: runs the command, fails on a non-zero exit or a self-reported skip.
step() {
    local name=$1
    shift
    echo "rdma tests: == $name"
    "$@" 2>&1 | tee /tmp/step.txt
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || fail "$name (exit $rc)"
    if grep -q "SKIPPED" /tmp/step.txt; then fail "$name: a test skipped itself"; fi
}

# passed NAME TEST...: after a step that ran a libtest binary, each TEST must have been
# reported "ok" by name, and the harness must have counted at least that many passes.
passed() {
    local name=$1
    shift
    local t
    for t in "$@"; do
        grep -qxF "test $t ... ok" /tmp/step.txt || fail "$name: test $t did not run and pass"
    done
    local n
    n=$(sed -nE 's/^test result: ok\. ([0-9]+) passed.*/\1/p' /tmp/step.txt | tail -n 1)
    [ -n "$n" ] || fail "$name: no test result line"
    [ "$n" -ge "$#" ] || fail "$name: $n tests passed, expected at least $#"
    [ "$n" -gt 0 ] || fail "$name: no test ran"
}

# tests BINARY NAME...: runs exactly the named tests of BINARY (ignored ones included: the
# RDMA-only tests are #[ignore]d on hosts without RDMA), then checks each passed by name.
tests() {
    local what=$1 bin=$2 limit=$3
    shift 3
    step "$what" timeout "$limit" "$bin" --include-ignored --exact "$@" --test-threads 1 --show-output
    passed "$what" "$@"
}

step "environment (smoke.sh)" "$here/smoke.sh" "$rmc"
export RMC_TEST_TRANSPORT=rdma RMC_REQUIRE_KVM=1

# Every protocol fault test of bad_input runs over RDMA here (all of them, so a new one is
# covered without editing this list); the RDMA-specific ones must each be seen passing.
step "protocol faults over RDMA" timeout 900 "$bad_input" --include-ignored --test-threads 1 --show-output
passed "protocol faults over RDMA" $("$bad_input" --list --ignored | sed -nE 's/^(rdma_[a-z0-9_]+): test$/\1/p')
total=$("$bad_input" --list --include-ignored | grep -c ': test$')
grep -qE "^test result: ok\. $total passed" /tmp/step.txt || fail "protocol faults over RDMA: not all $total tests passed"
[ "$("$bad_input" --list --ignored | grep -c ': test$')" -ge 4 ] || fail "bad_input lists fewer than 4 RDMA-only tests"

tests "replication over RDMA (>= 200 epochs, backup == primary)" "$replication" 900 \
    rdma_replicates_200_epochs_then_backup_equals_primary_and_runs
tests "failover over RDMA (10 trials, link cut at random moments)" "$replication" 1200 \
    rdma_failover_trials_in_process
tests "replication over RDMA with the guest busy at the last checkpoint" "$replication" 900 \
    replicates_with_the_guest_busy_then_backup_equals_primary_and_runs

step "failover of SIGKILLed processes over RDMA (rmc demo, 10 trials)" timeout 1500 "$rmc" \
    --log warn demo --transport rdma --trials 10 --memory 64M --heartbeat-ms 200 \
    --heartbeat-misses 15
[ "$(grep -c '; consistent$' /tmp/step.txt)" -eq 10 ] || fail "rmc demo: not 10 consistent trials"
grep -q "over rdma\|standby listening on rdma" /tmp/step.txt || fail "rmc demo did not use RDMA"

step "rmc bench --transport tcp,rdma" timeout 900 "$rmc" --log warn bench --memory 64M \
    --dirty-pages 100,1000 --transport tcp,rdma --seconds 2 --heartbeat-ms 200 \
    --heartbeat-misses 25 --part sweep --json
python3 - /tmp/step.txt <<'PY' || fail "rmc bench --transport rdma: figures missing"
import json, sys
line = [l for l in open(sys.argv[1]) if l.startswith('{"')][-1]
rows = json.loads(line)["rows"]
rdma = [r for r in rows if r["transport"] == "rdma"]
assert len(rdma) == 2, f"{len(rdma)} rdma rows, expected 2"
for r in rdma:
    assert r["checkpoints"] > 0, r
    for phase in ("pause", "transmit", "commit_to_ack", "end_to_end"):
        p = r["phases"][phase]
        assert p["count"] > 0 and p["p50"] <= p["p99"] <= p["max"], (phase, p)
    assert r["raw_bytes_per_s"] > 0 and r["link_efficiency"] > 0, r
print("rmc bench rdma rows:", [(r["dirty_pages"], r["checkpoints"]) for r in rdma])
PY
echo "rdma tests: ok"
