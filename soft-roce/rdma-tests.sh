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
#      the primary SIGKILLed at a random moment under a checking client, 10 times.
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

step() {
    local name=$1
    shift
    echo "rdma tests: == $name"
    "$@" 2>&1 | tee /tmp/step.txt
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || fail "$name (exit $rc)"
    if grep -q "SKIPPED" /tmp/step.txt; then fail "$name: a test skipped itself"; fi
}

step "environment (smoke.sh)" "$here/smoke.sh" "$rmc"
export RMC_TEST_TRANSPORT=rdma RMC_REQUIRE_KVM=1
step "protocol faults over RDMA" timeout 900 "$bad_input" --test-threads 1 --nocapture
step "replication over RDMA (>= 200 epochs, backup == primary)" timeout 900 "$replication" \
    --exact rdma_replicates_200_epochs_then_backup_equals_primary_and_runs --nocapture
step "failover over RDMA (10 trials, link cut at random moments)" timeout 1200 "$replication" \
    --exact rdma_failover_trials_in_process --nocapture
step "replication over RDMA with the guest busy at the last checkpoint" timeout 900 \
    "$replication" --exact replicates_with_the_guest_busy_then_backup_equals_primary_and_runs \
    --nocapture
step "failover of SIGKILLed processes over RDMA (rmc demo, 10 trials)" timeout 1500 "$rmc" \
    --log warn demo --transport rdma --trials 10 --memory 64M --heartbeat-ms 200 \
    --heartbeat-misses 15
echo "rdma tests: ok"
