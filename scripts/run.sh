#!/usr/bin/env bash
# minivmm's main job, the README's run command.
#
#   scripts/run.sh                  boot the bundled test guest with a scratch disk
#                                   and, as root, a network device on a TAP in a
#                                   network namespace of its own: its report,
#                                   including the block and network self-tests
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
    net_word=""
    if ! has --net "$@"; then
        # A TAP needs root; it lives in a namespace of its own, with the UDP
        # echo service the guest's self-test talks to, removed at exit.
        if [[ $(id -u) -eq 0 && -c /dev/net/tun ]] && command -v ip >/dev/null; then
            cargo build --release --quiet -p tests --bin net-peer >&2
            netns="minivmm-run-$$"
            ip netns add "$netns"
            trap 'ip netns del "$netns" 2>/dev/null || true' EXIT
            ip -n "$netns" link set lo up
            ip -n "$netns" tuntap add dev tap0 mode tap
            ip -n "$netns" addr add 10.0.2.2/24 dev tap0
            ip -n "$netns" link set tap0 up
            ip netns exec "$netns" target/release/net-peer echo 0.0.0.0:7 600 >/dev/null &
            echo_pid=$!
            trap 'kill $echo_pid 2>/dev/null || true; ip netns del "$netns" 2>/dev/null || true' EXIT
            run_in=(ip netns exec "$netns")
            extra+=(--net tap=tap0)
            net_word=" testguest.net=ip=10.0.2.15/24,peer=10.0.2.2,port=7"
            sleep 0.2
        else
            echo "run.sh: no network device: a TAP needs root, /dev/net/tun and ip (iproute2)" >&2
        fi
    fi
    if ! has --cmdline "$@"; then
        extra+=(--cmdline "console=ttyS0 testguest.blk=write$net_word")
    fi
    set -- "${extra[@]}" "$@"
fi
cargo build --release --quiet -p vmm --bin minivmm >&2
if [[ -n ${run_in+x} ]]; then
    "${run_in[@]}" target/release/minivmm "$@"
else
    exec target/release/minivmm "$@"
fi
