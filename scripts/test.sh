#!/usr/bin/env bash
# Installs what the tests need (Debian packages, cargo tools), then runs every check:
# formatting, clippy, a bounded fuzz run of the .velo decoder, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 make nodejs git python3 python3-pip python3-venv libdpkg-perl debconf e2fsprogs btrfs-progs xfsprogs util-linux bsdutils procps gcc libc6-dev busybox-static debootstrap strace)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
if [ "$(id -u)" = 0 ]; then
    bash scripts/setup_debian_base.sh || echo "warning: no Debian base for the real-build test" >&2
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
command -v fsx >/dev/null || cargo install --locked fsx
command -v pjdfstest >/dev/null || [ -x "$HOME/.cargo/bin/pjdfstest" ] || cargo install --locked pjdfstest
# numpy and pandas installed with pip into a directory, for the shim's real-software test
# (the interpreter that installed them is recorded beside them).
np_dir=${VELO_NUMPY_DIR:-/var/cache/velo-tests/numpy-pandas}
if [ ! -f "$np_dir/.python" ] && mkdir -p "$np_dir" 2>/dev/null; then
    py=$(python3 -c 'import sys; print(sys.executable)')
    if "$py" -m pip install --quiet --disable-pip-version-check --break-system-packages \
        --target "$np_dir/pkgs" numpy pandas; then
        echo "$py" > "$np_dir/.python"
    else
        echo "warning: pip could not install numpy and pandas for the shim test" >&2
    fi
fi

# moto's S3 server, for the remote tests (crates/velo-cli/tests/remote.rs): pip into a
# directory, as above.
moto_dir=${VELO_MOTO_DIR:-/var/cache/velo-tests/moto/pkgs}
if [ ! -d "$moto_dir/moto" ] && mkdir -p "$moto_dir" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
        --target "$moto_dir" 'moto[server]' || echo "warning: pip could not install moto for the remote tests" >&2
fi
export VELO_MOTO_DIR=$moto_dir

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

if [ -d fuzz ]; then
    echo "== fuzzing the .velo decoder for ${VELO_FUZZ_SECONDS:-60} s"
    # regressions/ holds inputs that once failed; they run first, every time.
    (cd fuzz && mkdir -p corpus/manifest && RUSTC_BOOTSTRAP=1 cargo fuzz run manifest corpus/manifest regressions/manifest -- -max_total_time="${VELO_FUZZ_SECONDS:-60}" -rss_limit_mb=2048 2>&1 | grep -v -E "^ +(at |[0-9]+: )" | tail -n 25)
    echo "== fuzzing the control messages' decoder for ${VELO_FUZZ_CONTROL_SECONDS:-20} s"
    (cd fuzz && mkdir -p corpus/control && RUSTC_BOOTSTRAP=1 cargo fuzz run control corpus/control -- -max_total_time="${VELO_FUZZ_CONTROL_SECONDS:-20}" -rss_limit_mb=2048 2>&1 | grep -v -E "^ +(at |[0-9]+: )" | tail -n 8)
fi

echo "== tests"
# Tests that need what this machine lacks (namespaces, root, loop devices) return early and
# the harness counts them as passed; they record themselves here and are listed below as
# skipped. Under CI=true they fail instead.
VELO_SKIPPED_LOG=$(mktemp)
export VELO_SKIPPED_LOG
status=0
cargo nextest run --workspace --no-fail-fast --profile "${NEXTEST_PROFILE:-default}" || status=$?
if [ -s "$VELO_SKIPPED_LOG" ]; then
    echo "== SKIPPED (counted as passed above, but they did not run): $(sort -u "$VELO_SKIPPED_LOG" | wc -l)"
    sort -u "$VELO_SKIPPED_LOG" | sed 's/^/   /'
fi
rm -f "$VELO_SKIPPED_LOG"

# POSIX conformance of velo mount against ext4 on the same machine (scripts/pjdfstest_mount.sh;
# exceptions with reasons in scripts/pjdfstest_exceptions.txt), once per run here.
if [ "$(id -u)" = 0 ]; then
    echo "== pjdfstest: velo mount against ext4"
    VELO=${VELO:-${CARGO_TARGET_DIR:-$PWD/target}/debug/velo} bash scripts/pjdfstest_mount.sh --repeat 1 -o target/pjdfstest || status=1
elif [ "${CI:-}" = true ]; then
    echo "== pjdfstest: FAILED: needs root (a loop ext4, pjdfstest's user switches)"
    status=1
else
    echo "== SKIPPED pjdfstest (needs root): sudo bash scripts/pjdfstest_mount.sh"
fi
exit "$status"
