#!/usr/bin/env bash
# Builds every fuzz target (cargo-fuzz, libFuzzer, the nightly toolchain) and
# runs each for FUZZ_SECONDS (default 60) on its seed corpus, one at a time.
# A crash fails the script and prints the crashing input in hex; the input is
# kept in fuzz/artifacts/<target>/ (add it to fuzz/regressions/<target>/ once
# fixed: `cargo test -p fuzz-harness` replays it on stable from then on).
#
#   scripts/fuzz.sh                       every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh      longer runs
#   scripts/fuzz.sh block serial          some targets
#
# Installs cargo-fuzz (cargo install --locked) when it is missing. The corpus
# libFuzzer grows stays in fuzz/corpus/<target>/ but out of git (.gitignore);
# runs start from it, so repeated runs go deeper.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(virtqueue virtio_mmio block serial ioapic boot_image queue_differential net api_request snapshot_state)
fi
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
rustup run "$toolchain" rustc --version >/dev/null 2>&1 || {
    echo "fuzz.sh: error: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 1
}

cd fuzz
echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
    cargo "+$toolchain" fuzz build -O "$t"
done

failed=()
summary=()
for t in "${targets[@]}"; do
    echo "== $t: ${seconds} s"
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$(mktemp)"
    if cargo "+$toolchain" fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 \
        -rss_limit_mb=4096 >"$log" 2>&1; then
        execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
        cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
        summary+=("$t: $execs executions in ${seconds} s, $cov, no crash")
    else
        tail -n 40 "$log"
        for f in artifacts/"$t"/crash-* artifacts/"$t"/leak-* artifacts/"$t"/timeout-* artifacts/"$t"/oom-*; do
            [ -f "$f" ] || continue
            echo "-- crashing input $f:"
            xxd "$f" | head -n 64
        done
        failed+=("$t")
        summary+=("$t: CRASH (see above)")
    fi
    rm -f "$log"
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
