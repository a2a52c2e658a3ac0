//! AFL++ entry point of the `wire_frames` target (see `rmc_fuzz::wire_frames`).

fn main() {
    afl::fuzz!(|data: &[u8]| rmc_fuzz::wire_frames(data));
}
