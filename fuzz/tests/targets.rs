//! The fuzz targets as part of `cargo test`: every file of the committed corpus
//! (`fuzz/corpus/<target>/`) is replayed through its target, then each target gets a couple
//! of seconds of random inputs (fresh bytes and mutations of the corpus), a smoke test of what
//! the coverage-guided runs (docs/DEVELOPING.md, "Fuzzing") do for hours.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmc_fuzz::input::Rng;
use rmc_fuzz::{target, Target, TARGETS};

/// Random inputs per target: at most this long...
const BUDGET: Duration = Duration::from_millis(1800);
/// ...and at most this many.
const MAX_RUNS: u64 = 200_000;

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

/// The files of a corpus directory, sorted by name.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("a readable corpus file");
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Runs `t` on `input`; a panic becomes a failure that shows the input.
fn run(name: &str, t: Target, input: &[u8], origin: &str) {
    if catch_unwind(AssertUnwindSafe(|| t(input))).is_err() {
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        panic!("{name} failed on {origin} ({} bytes): {hex}", input.len());
    }
}

#[test]
fn every_target_has_a_corpus() {
    for (name, _) in TARGETS {
        let n = files(&corpus_dir(name)).len();
        assert!(n > 0, "fuzz/corpus/{name}/ is empty");
    }
}

#[test]
fn corpus_replays_clean() {
    let mut total = 0;
    for (name, t) in TARGETS {
        for (path, bytes) in files(&corpus_dir(name)) {
            run(name, *t, &bytes, &path.display().to_string());
            total += 1;
        }
    }
    println!("replayed {total} corpus files");
}

fn random_inputs(name: &str, seed: u64) {
    let t = target(name).expect("a target");
    let corpus: Vec<Vec<u8>> = files(&corpus_dir(name))
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut runs = 0u64;
    while runs < MAX_RUNS && start.elapsed() < BUDGET {
        let input = match rng.below(4) {
            0 if !corpus.is_empty() => {
                let base = &corpus[rng.below(corpus.len() as u64) as usize];
                rng.mutate(base)
            }
            1 if !corpus.is_empty() => {
                // Two corpus inputs spliced.
                let a = &corpus[rng.below(corpus.len() as u64) as usize];
                let b = &corpus[rng.below(corpus.len() as u64) as usize];
                let (i, j) = (
                    rng.below(a.len() as u64 + 1) as usize,
                    rng.below(b.len() as u64 + 1) as usize,
                );
                [&a[..i], &b[j..]].concat()
            }
            2 => {
                // Bytes below 144: every event the protocol targets choose is the next
                // well-behaved step, so they get deep (handshake, epochs, commits).
                let len = 100 + rng.below(1500) as usize;
                (0..len).map(|_| rng.below(144) as u8).collect()
            }
            _ => {
                let max = if rng.below(8) == 0 { 4096 } else { 400 };
                let len = rng.below(max);
                rng.bytes(len as usize)
            }
        };
        run(
            name,
            t,
            &input,
            &format!("random input {runs} (seed {seed})"),
        );
        runs += 1;
    }
    println!(
        "{name}: {runs} random inputs in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn random_wire_frames() {
    random_inputs("wire_frames", 1);
}

#[test]
fn random_standby_core() {
    random_inputs("standby_core", 2);
    let applied = rmc_fuzz::APPLIED.load(Ordering::Relaxed);
    println!("standby_core: {applied} epochs applied");
    assert!(applied > 0, "no input got as far as applying an epoch");
}

#[test]
fn random_primary_core() {
    random_inputs("primary_core", 3);
    let acked = rmc_fuzz::ACKED.load(Ordering::Relaxed);
    println!("primary_core: {acked} epochs acknowledged");
    assert!(acked > 0, "no input got as far as an acknowledged epoch");
}

#[test]
fn random_vm_state() {
    random_inputs("vm_state", 4);
}

/// The `vm_state` corpus covers the decoder past the header: some of its files are whole
/// states of this build's encoding (mode 0: the input after its first byte is the blob) that
/// decode. They are the named seeds `state-*` (and `body-*`, the same without the header) of
/// `fuzz/examples/seeds.rs`, which `fuzz/afl/run.sh` keeps (AFL++'s minimized queue reaches
/// that code through the states built in modes 2 and 3 instead). After a change of
/// `rmc_vmm::state::VERSION` they are refused at the version: regenerate them.
#[test]
fn vm_state_corpus_holds_states_that_decode() {
    let files = files(&corpus_dir("vm_state"));
    let decoded = files
        .iter()
        .filter(|(_, b)| b.first().is_some_and(|m| m % 4 == 0))
        .filter(|(_, b)| rmc_vmm::VmState::decode(&b[1..]).is_ok())
        .count();
    println!(
        "vm_state: {decoded} of {} corpus files are states that decode",
        files.len()
    );
    assert!(
        decoded > 0,
        "no fuzz/corpus/vm_state/ file holds a state of encoding version {} that decodes: \
         `cargo run -p rmc-fuzz --example seeds -- DIR`, copy DIR/vm_state/state-* and \
         DIR/vm_state/body-* into fuzz/corpus/vm_state/, then `fuzz/afl/run.sh vm_state`",
        rmc_vmm::state::VERSION
    );
}
