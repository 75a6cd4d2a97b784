#!/usr/bin/env bash
# minivmm's whole test suite: the README's test command, and what .ci/run calls.
#
# It installs what it needs on a fresh Debian machine (guest-images/build.sh
# installs Debian's rustc-web toolchain for the test guest). KVM tests skip with
# a printed reason when /dev/kvm is unusable, unless MINIVMM_REQUIRE_KVM=1 (CI),
# where they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Real peers the tests need, from Debian's packages: the system's own ping
# and ip for the network tests, ACPICA's iasl to decode minivmm's ACPI tables.
if ! command -v ping >/dev/null || ! command -v ip >/dev/null || ! command -v iasl >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "installing iputils-ping, iproute2 and acpica-tools for the tests"
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y iputils-ping iproute2 acpica-tools >/dev/null
    else
        echo "network and iasl tests will skip: ping, ip or iasl missing (apt-get install iputils-ping iproute2 acpica-tools as root)"
    fi
fi
# The frame allocator's core must stay no_std for the guest kernel.
cargo build -p memory --no-default-features
# What the integration tests run: the test guest kernel and the minivmm binary
# (tests cannot build them: cargo holds its build lock while tests run).
guest="$(guest-images/build.sh)"
echo "test guest: $guest"
cargo build -p vmm --bin minivmm
# Benchmarks in test mode: each runs once, so they keep building and working.
cargo test --workspace --bench '*'
# Unit, property and integration tests, doctests. Integration tests boot guests
# one at a time: on two cores, parallel emulated guests only slow each other.
cargo test --workspace --exclude tests
cargo test -p tests -- --test-threads=1
# The README's run command, as a user runs it.
if [ -c /dev/kvm ] || [ "${MINIVMM_REQUIRE_KVM:-}" = 1 ]; then
    echo "== scripts/run.sh (README run command)"
    out="$(scripts/run.sh)"
    grep -E "testguest: (blk|dma|selftest)" <<<"$out"
    grep -q "testguest: blk0: read back: ok" <<<"$out"
    grep -q "testguest: blk0: PASS" <<<"$out"
    grep -q "testguest: selftest: PASS" <<<"$out"
    if [ "$(id -u)" -eq 0 ] && [ -c /dev/net/tun ]; then
        grep -E "testguest: net0" <<<"$out"
        grep -q "testguest: net0: PASS" <<<"$out"
    fi
else
    echo "SKIPPED scripts/run.sh: /dev/kvm is not usable"
fi
