# The two commands of the README. Both install missing Debian packages first.
.PHONY: demo test deps

deps:
	./scripts/install-deps.sh

# The main job: primary + standby + a checking client; the primary is SIGKILLed and the
# standby takes over; prints what happened (see `rmc demo --help`).
demo: deps
	cargo build --release --bin rmc
	target/release/rmc demo

# Every test, plus formatting and lints (--show-output: figures that tests print, such as the
# failover-time distribution, appear in the log). KVM tests skip without /dev/kvm unless
# RMC_REQUIRE_KVM=1 (which .ci/run sets when /dev/kvm exists), where they fail instead.
test: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace -- --show-output
	# The RDMA tests, inside a throwaway Soft-RoCE VM (see soft-roce/README.md): a missing RDMA
	# device is a failure there, not a skip.
	cargo build --bin rmc
	soft-roce/run-in-vm.sh --cpus 1 -- soft-roce/rdma-tests.sh $$(scripts/test-binaries.sh rmc bad_input replication)
