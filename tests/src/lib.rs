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
    dir.join("rmc")
}
