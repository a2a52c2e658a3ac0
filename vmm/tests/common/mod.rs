//! Shared helpers for the KVM tests.

use std::time::{Duration, Instant};

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

/// Polls `cond` until it holds, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}
