#!/usr/bin/env bash
# Makes (once, cached) a Debian bookworm root with gcc, libc6-dev, make and python3 for the
# real-build and exact-metadata tests of `velo run --isolate`: debootstrap --variant=minbase.
# Usage: scripts/setup_debian_base.sh [DIR]   (default: /var/cache/velo-tests/bookworm-gcc)
set -euo pipefail
dir=${1:-${VELO_DEBIAN_ROOT:-/var/cache/velo-tests/bookworm-gcc}}
if [ -x "$dir/usr/bin/gcc" ] && [ -x "$dir/usr/bin/python3" ] && [ -f "$dir/.velo-complete" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup_debian_base.sh: debootstrap needs root" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
echo "== debootstrap --variant=minbase --include=gcc,libc6-dev,make,python3 bookworm $dir"
debootstrap --variant=minbase --include=gcc,libc6-dev,make,python3 bookworm "$dir" http://deb.debian.org/debian >/dev/null
touch "$dir/.velo-complete"
