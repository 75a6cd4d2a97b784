#!/usr/bin/env bash
# Builds the test guest kernel (testguest, x86_64-unknown-none) and prints the
# absolute path of its ELF as the last line of stdout; all else goes to stderr.
#
# The guest needs Debian's Rust toolchain (rustc-web, cargo-web, rust-web-src):
# rustup has no x86_64-unknown-none target or rust-src on the project's machines,
# and core is rebuilt from source (-Zbuild-std, see .cargo/config.toml). This
# script installs the packages when they are missing (as root, with apt-get).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rustc=/usr/bin/rustc
cargo=/usr/bin/cargo
rust_src=/usr/lib/rustlib/src/rust/library
packages=(rustc-web cargo-web rust-web-src)

log() { echo "build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ ! -x $rustc || ! -x $cargo || ! -d $rust_src ]]; then
    log "Debian's Rust toolchain is missing ($rustc, $cargo or $rust_src)"
    command -v apt-get >/dev/null || die "apt-get not found: install ${packages[*]} by hand"
    [[ $(id -u) -eq 0 ]] || die "not root: run 'apt-get update && apt-get install -y ${packages[*]}' as root"
    log "running: apt-get update && apt-get install -y ${packages[*]}"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}" >&2
    [[ -x $rustc && -x $cargo && -d $rust_src ]] || die "the packages did not provide $rustc, $cargo and $rust_src"
fi
command -v ld >/dev/null || die "GNU ld not found (apt-get install binutils)"

# The flags live in .cargo/config.toml, which cargo reads from its working
# directory; RUSTFLAGS from the environment would replace them.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
cd "$here"
target_dir="$here/target"
RUSTC=$rustc RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}" \
    "$cargo" build --release --target-dir "$target_dir" -p testguest >&2

elf="$target_dir/x86_64-unknown-none/release/testguest"
[[ -f $elf ]] || die "cargo did not produce $elf"
echo "$elf"
