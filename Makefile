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
	# Then, in the same VM boot, a stock Linux kernel in the rmc VMM (its nested KVM runs one,
	# which the build machines' own KVM cannot): 2 vCPUs boot to the shell prompt on the serial
	# console (soft-roce/linux-tests.sh; the guest images are built here from the installed
	# busybox-static and kernel modules).
	guest-linux/build-initramfs.sh --service seq -o target/guest-linux/seq.cpio.gz
	guest-linux/build-initramfs.sh --run 'echo "rmc-guest: cpus online: $$(grep -c ^processor /proc/cpuinfo)"' -o target/guest-linux/shell.cpio.gz
	soft-roce/run-in-vm.sh --cpus 1 -- bash -c 'soft-roce/rdma-tests.sh "$$@" && soft-roce/linux-tests.sh --boot-only target/debug/rmc target/guest-linux/seq.cpio.gz target/guest-linux/shell.cpio.gz' rdma $$(cat target/rdma-test-binaries)
