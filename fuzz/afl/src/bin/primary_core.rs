//! AFL++ entry point of the `primary_core` target (see `rmc_fuzz::primary_core`).

fn main() {
    afl::fuzz!(|data: &[u8]| rmc_fuzz::primary_core(data));
}
