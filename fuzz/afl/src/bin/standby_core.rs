//! AFL++ entry point of the `standby_core` target (see `rmc_fuzz::standby_core`).

fn main() {
    afl::fuzz!(|data: &[u8]| rmc_fuzz::standby_core(data));
}
