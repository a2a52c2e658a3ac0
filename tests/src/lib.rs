//! rmc-tests: end-to-end tests that run the real `rmc` binary (`tests/tests/*.rs`).
//!
//! [`rmc_bin`] finds the binary Cargo built for this workspace.

use std::path::PathBuf;

/// Path of the `rmc` binary built in this workspace's target directory.
pub fn rmc_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("rmc");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p rmc-vmm`, or run `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// True when KVM can be used. Without /dev/kvm the test is skipped with a message, unless
/// `RMC_REQUIRE_KVM=1` (set by `.ci/run` on machines that have /dev/kvm), where it fails.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("RMC_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm cannot be opened, and RMC_REQUIRE_KVM=1 forbids skipping");
        }
        eprintln!("SKIPPED {test}: /dev/kvm cannot be opened (needs KVM and permission to use it)");
    }
    ok
}
