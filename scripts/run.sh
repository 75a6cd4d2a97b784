#!/usr/bin/env bash
# minivmm's main job, the README's run command.
#
#   scripts/run.sh                  boot the bundled test guest with a scratch disk:
#                                   its report, including the block I/O self-test
#   scripts/run.sh --mem 3G         the same with other minivmm options
#   scripts/run.sh --kernel IMAGE   boot any kernel: all arguments go to minivmm
#
# It builds what it needs first: the test guest (guest-images/build.sh installs
# Debian's rustc-web toolchain for it if missing) and minivmm (release). The
# scratch disk is target/run/scratch.img (64 MiB, recreated on every run).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

has() {
    local flag="$1"
    shift
    for arg in "$@"; do
        case "$arg" in
            "$flag" | "$flag"=*) return 0 ;;
        esac
    done
    return 1
}

if ! has --kernel "$@"; then
    guest="$(guest-images/build.sh)"
    extra=(--kernel "$guest")
    if ! has --disk "$@"; then
        mkdir -p target/run
        scratch=target/run/scratch.img
        rm -f "$scratch"
        truncate -s 64M "$scratch"
        # Something to read back: a recognisable first MiB.
        head -c 1M /dev/urandom | dd of="$scratch" conv=notrunc status=none
        extra+=(--disk "$scratch,id=scratch")
    fi
    if ! has --cmdline "$@"; then
        extra+=(--cmdline "console=ttyS0 testguest.blk=write")
    fi
    set -- "${extra[@]}" "$@"
fi
cargo build --release --quiet -p vmm --bin minivmm >&2
exec target/release/minivmm "$@"
