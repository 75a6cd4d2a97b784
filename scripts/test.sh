#!/usr/bin/env bash
# minivmm's whole test suite: the README's test command, and what .ci/run calls.
#
# It installs what it needs on a fresh Debian machine. KVM tests skip with a
# printed reason when /dev/kvm is unusable, unless MINIVMM_REQUIRE_KVM=1 (CI),
# where they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The frame allocator's core must stay no_std for the guest kernel.
cargo build -p memory --no-default-features
# Benchmarks in test mode: each runs once, so they keep building and working.
cargo test --workspace --bench '*'
# Unit, property and integration tests, doctests.
cargo test --workspace
