#!/usr/bin/env bash
# Coverage-guided fuzzing of one rmc-fuzz target with AFL++ through cargo-afl (stable Rust).
#
#   fuzz/afl/run.sh TARGET [EXECS]      TARGET: wire_frames standby_core primary_core vm_state
#
# Builds the harness (fuzz/afl, instrumented, into target/afl), starts from the committed
# corpus fuzz/corpus/TARGET plus fresh seeds, runs AFL++ for about EXECS executions (default
# 10,500,000) into target/afl-out/TARGET, prints its figures, then minimizes the queue
# (afl-cmin -e: the fewest inputs that keep every edge, hit counts ignored, so the committed
# corpus stays at about a hundred small files) back into fuzz/corpus/TARGET. Exits 1 if AFL++ saved a crash (they are in
# target/afl-out/TARGET/default/crashes; reproduce with `target/afl/release/TARGET < FILE`).
# One target at a time per core: the machines have two.
set -euo pipefail
t=${1:?usage: fuzz/afl/run.sh TARGET [EXECS]}
execs=${2:-10500000}
cd "$(dirname "$0")/../.."
[ -d "fuzz/corpus/$t" ] || { echo "no target $t (fuzz/corpus/$t)" >&2; exit 2; }

command -v cargo-afl >/dev/null || cargo install cargo-afl --locked
(cd fuzz/afl && cargo afl build --release --target-dir ../../target/afl)
bin=target/afl/release/$t

seeds=target/afl-seeds
rm -rf "$seeds" && cargo run -q -p rmc-fuzz --example seeds -- "$seeds"
find "fuzz/corpus/$t" -type f -exec cp {} "$seeds/$t/" \;

out=target/afl-out/$t
rm -rf "$out"
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
cargo afl fuzz -i "$seeds/$t" -o "$out" -E "$execs" "$bin"
grep -E 'run_time|execs_done|execs_per_sec|corpus_count|saved_crashes' "$out/default/fuzzer_stats"

# afl-cmin.bash: `cargo afl cmin` (the Python afl-cmin) finds no coverage in these binaries.
afl_bin=$(ls -td "$HOME"/.local/share/afl.rs/rustc-*/afl.rs-*/afl/bin | head -1)
min=target/afl-min/$t
rm -rf "$min"
PATH="$afl_bin:$PATH" afl-cmin.bash -e -i "$out/default/queue" -o "$min" -- "$bin" \
    > target/afl-out/$t.cmin.log 2>&1 || { tail -5 target/afl-out/$t.cmin.log; exit 1; }
# Files named by hash are replaced; named ones (reproducers of fixed bugs) stay.
find "fuzz/corpus/$t" -type f -regextype posix-egrep -regex '.*/[0-9a-f]{16}' -delete
for f in "$min"/*; do
    kept=no
    for n in "fuzz/corpus/$t"/*; do
        if [ -f "$n" ] && cmp -s "$f" "$n"; then kept=yes; fi
    done
    [ $kept = yes ] || cp "$f" "fuzz/corpus/$t/$(sha1sum "$f" | cut -c1-16)"
done
echo "fuzz/corpus/$t: $(ls "fuzz/corpus/$t" | wc -l) files, $(du -sh "fuzz/corpus/$t" | cut -f1)"

crashes=$(ls "$out/default/crashes" 2>/dev/null | grep -vc README || true)
if [ "$crashes" -gt 0 ]; then
    echo "AFL++ saved $crashes crash(es) in $out/default/crashes" >&2
    exit 1
fi
