#!/usr/bin/env bash
# Fetches a Linux kernel nobody here wrote: Debian's linux-image-cloud-amd64
# bzImage, for the slow distribution-kernel test (tests/tests/linux.rs). Prints
# the bzImage path as the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/linux
mkdir -p "$dir"
if ! ls "$dir"/vmlinuz-* >/dev/null 2>&1; then
    command -v apt-get >/dev/null || { echo "fetch-linux.sh: needs Debian's apt-get" >&2; exit 1; }
    package="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
    if [ -z "$package" ]; then
        apt-get update >&2
        package="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"
    fi
    echo "fetch-linux.sh: downloading $package" >&2
    (cd "$dir" && apt-get download "$package" >&2 2>/dev/null || apt-get download "$package" >&2)
    dpkg-deb --fsys-tarfile "$dir/$package"_*.deb | tar -x -C "$dir" --strip-components=2 ./boot/
    rm -f "$dir/$package"_*.deb
fi
realpath "$(ls "$dir"/vmlinuz-* | head -n 1)"
