# The two commands of the README. Both install missing Debian packages first.
.PHONY: demo test deps

deps:
	./scripts/install-deps.sh

# The main job: a standby and a protected VM (TCP loopback), clients checking its replies.
demo: deps
	cargo build --release --bin rmc
	./scripts/demo.sh

# Every test, plus formatting and lints. KVM tests skip without /dev/kvm unless
# RMC_REQUIRE_KVM=1 (which .ci/run sets when /dev/kvm exists), where they fail instead.
test: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace
