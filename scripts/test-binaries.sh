#!/usr/bin/env bash
# Prints the paths of the named binaries of this workspace's dev build: `rmc` (the CLI) and
# test targets by name (e.g. bad_input replication), building the tests if needed. Build
# errors are shown (cargo's messages go to stderr) and make this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
json=$(cargo test --workspace --no-run --message-format=json-render-diagnostics)
tests=$(python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' <<<"$json")
for name in "$@"; do
    if [ "$name" = rmc ]; then
        [ -x "$target/debug/rmc" ] || { echo "test-binaries.sh: $target/debug/rmc is not built" >&2; exit 1; }
        echo "$target/debug/rmc"
        continue
    fi
    path=$(awk -v n="$name" '$1 == n { print $2 }' <<<"$tests" | tail -n 1)
    [ -n "$path" ] || { echo "test-binaries.sh: no test binary named $name" >&2; exit 1; }
    echo "$path"
done
