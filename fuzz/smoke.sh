#!/usr/bin/env bash
# A bounded smoke run of every fuzz target: each runs for SECONDS (default
# 20, at most 30) from its committed seed corpus (fuzz/corpus/<target>, read
# only: new inputs go to a scratch directory). Installs cargo-fuzz if it is
# missing. cargo fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 allows them on
# the stable toolchain. Exits non-zero on the first crash (the reproducer is
# in fuzz/artifacts/<target>/).
#
# FUZZ_BUILD=dev builds without optimizations (about half the build time,
# fewer runs per second: what CI uses for its smoke run); the default is
# cargo fuzz's optimized build with debug assertions. Both use AddressSanitizer.
#
#   bash fuzz/smoke.sh                      # every target, 20 s each
#   bash fuzz/smoke.sh dns_query            # one target
#   FUZZ_BUILD=dev FUZZ_SECONDS=10 bash fuzz/smoke.sh
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${FUZZ_SECONDS:-20}"
[ "$SECONDS_EACH" -le 30 ] || SECONDS_EACH=30
export RUSTC_BOOTSTRAP=1
build_flags=()
case "${FUZZ_BUILD:-release}" in
    dev) build_flags=(--dev) ;;
    release) ;;
    *) echo "FUZZ_BUILD must be dev or release" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
# cargo fuzz has no --locked: check that Cargo.lock needs no change first.
cargo fetch --locked
cargo fuzz build "${build_flags[@]}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
passed=0
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "== fuzz $t (${SECONDS_EACH}s)"
    if cargo fuzz run "${build_flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>"$scratch/$t.log"; then
        grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$scratch/$t.log" | tail -1 || true
        passed=$((passed + 1))
    else
        tail -40 "$scratch/$t.log"
        failed=$((failed + 1))
        echo "fuzz: $t failed; reproducer in fuzz/artifacts/$t/" >&2
    fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
