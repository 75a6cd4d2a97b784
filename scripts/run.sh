#!/usr/bin/env bash
# minivmm's main job, the README's run command.
#
#   scripts/run.sh                  boot the bundled test guest (its report on the console)
#   scripts/run.sh --mem 3G         the same with other minivmm options
#   scripts/run.sh --kernel IMAGE   boot any kernel; all arguments go to minivmm
#
# It builds what it needs first: the test guest (guest-images/build.sh installs
# Debian's rustc-web toolchain for it if missing) and minivmm (release).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

kernel_given=no
for arg in "$@"; do
    case "$arg" in
        --kernel | --kernel=*) kernel_given=yes ;;
    esac
done
if [ "$kernel_given" = no ]; then
    guest="$(guest-images/build.sh)"
    set -- --kernel "$guest" "$@"
fi
cargo build --release --quiet -p vmm --bin minivmm >&2
exec target/release/minivmm "$@"
