//! AFL++ entry point of the `vm_state` target (see `rmc_fuzz::vm_state`).

fn main() {
    afl::fuzz!(|data: &[u8]| rmc_fuzz::vm_state(data));
}
