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
# failover-time distribution, appear in the log). KVM tests skip, saying so, without /dev/kvm
# unless RMC_REQUIRE_KVM=1 (which .ci/run always sets), where they fail instead. The RDMA-only
# tests are #[ignore]d here and run inside the Soft-RoCE VM below.
test: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace -- --show-output
	# The RDMA tests, inside a throwaway Soft-RoCE VM (see soft-roce/README.md): a missing RDMA
	# device is a failure there, not a skip. Build first, in its own step, so a build error
	# stops here with its message.
	cargo build --bin rmc
	cargo test --workspace --no-run
	scripts/test-binaries.sh rmc bad_input replication > target/rdma-test-binaries
	soft-roce/run-in-vm.sh --cpus 1 -- soft-roce/rdma-tests.sh $$(cat target/rdma-test-binaries)
