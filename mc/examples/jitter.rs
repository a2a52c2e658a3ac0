//! How late a thread that sleeps in a loop wakes up on this machine: the scheduling jitter a
//! heartbeat thread sees, which the heartbeat timeout must exceed with a margin.
//!
//! ```sh
//! cargo run --release -p rmc-mc --example jitter -- 30 50     # seconds, interval ms
//! ```
//!
//! Run it with the machine loaded as it will be in use (e.g. one CPU hog per core:
//! `for i in 1 2; do (while :; do :; done) & done`), and with a VM running beside it.

use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(30.0);
    let interval_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let interval = Duration::from_millis(interval_ms);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut late_us = Vec::new();
    while Instant::now() < end {
        let due = Instant::now() + interval;
        std::thread::sleep(interval);
        late_us.push(Instant::now().saturating_duration_since(due).as_micros() as u64);
    }
    late_us.sort_unstable();
    let q = |p: f64| late_us[((late_us.len() - 1) as f64 * p).round() as usize];
    println!(
        "{} wake-ups every {interval_ms} ms over {seconds} s; lateness us: p50 {} p99 {} p99.9 {} max {}",
        late_us.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
}
