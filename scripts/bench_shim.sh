#!/usr/bin/env bash
# Benchmark of the LD_PRELOAD shim (issue 10), each against a native baseline in the same
# run, alternated (A B A B ...), medians and ratios:
#  1. `find TREE -type f | xargs stat --format=%s` over linux-source-6.1: the tree through
#     the shim at /vrift vs the same tree unpacked natively (same fresh loop ext4);
#  2. `find TREE | wc -l` the same way;
#  3. `python3 -c 'import numpy, pandas'` from a pip-installed directory vs from its tree;
#  4. a C build: `make -j2` of zstd's library (the sources bundled in the zstd-sys crate, 40
#     files; fetched with cargo once) in a native copy vs in the tree through the shim, the
#     objects going to the run's upper;
#  5. `velo run --manifest M -- /bin/true` on a cached view vs `/bin/true` (start-up cost),
#     and the first run's view build reported apart.
# Usage: sudo bash scripts/bench_shim.sh      RUNS=7 (per contender)   SMALL=1 (fs/ only: CI)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-7}
img=/var/tmp/velo-bench-shim.img
mnt=/mnt/velo-bench-shim
packages=""
crates="-p velo-cli -p velo-shim"
# shellcheck source=scripts/bench_kernel_tree.sh
source scripts/bench_kernel_tree.sh
build_start=$(date +%s.%N)
"$velo" run --manifest kernel -- /bin/true
build_end=$(date +%s.%N)
echo "first run (builds the view): $(echo "$build_end - $build_start" | bc) s"

bench() { # name, native command (string), shim command (string)
    local name=$1 a=$2 b=$3 ta=() tb=()
    # Warm both: the source once natively (the blobs are other inodes: once through the shim).
    bash -c "$a" >/dev/null 2>&1; "$velo" run --manifest kernel -- bash -c "$b" >/dev/null 2>&1
    for _ in $(seq "$runs"); do
        ta+=("$(time_of bash -c "$a")")
        tb+=("$(time_of "$velo" run --manifest kernel -- bash -c "$b")")
    done
    local ma mb
    ma=$(printf '%s\n' "${ta[@]}" | median)
    mb=$(printf '%s\n' "${tb[@]}" | median)
    printf '%-34s native %8.3f s   shim %8.3f s   ratio %.2f\n' "$name" "$ma" "$mb" "$(echo "$mb / $ma" | bc -l)"
}

bench "find -type f | xargs stat" \
    "find $native -type f -print0 | xargs -0 stat --format=%s" \
    "find /vrift -type f -print0 | xargs -0 stat --format=%s"
bench "find | wc -l" "find $native | wc -l" "find /vrift | wc -l"
bench "cat every .c file" \
    "find $native -name '*.c' -print0 | xargs -0 cat" \
    "find /vrift -name '*.c' -print0 | xargs -0 cat"

# Python with C extensions: numpy and pandas installed with pip into a directory (cached
# in /var/cache/velo-bench/shim-np), copied to the loop file system and ingested; imported
# natively from the copy and through the shim from the tree (dlopen through its farm).
pydir=/var/cache/velo-bench/shim-np
if [ ! -f "$pydir/.complete" ]; then
    rm -rf "$pydir"; mkdir -p "$pydir"
    python3 -m pip install --quiet --disable-pip-version-check --target "$pydir/pkgs" numpy pandas
    touch "$pydir/.complete"
fi
cp -a "$pydir/pkgs" "$mnt/pkgs"
"$velo" ingest "$mnt/pkgs" --name np >/dev/null 2>&1
"$velo" run --manifest np -- /bin/true
ta=(); tb=()
py_native="import sys; sys.path.insert(0, '$mnt/pkgs'); import numpy, pandas"
py_shim="import sys; sys.path.insert(0, '/vrift'); import numpy, pandas"
# The interpreter itself, not a wrapper (pyenv's `python3` is a bash script that runs a
# dozen programs before Python starts, each of which would load the shim too).
py=$(python3 -c 'import sys; print(sys.executable)')
"$py" -c "$py_native"; "$velo" run --manifest np -- "$py" -c "$py_shim"
for _ in $(seq "$runs"); do
    ta+=("$(time_of "$py" -c "$py_native")")
    tb+=("$(time_of "$velo" run --manifest np -- "$py" -c "$py_shim")")
done
ma=$(printf '%s\n' "${ta[@]}" | median)
mb=$(printf '%s\n' "${tb[@]}" | median)
printf '%-34s native %8.3f s   shim %8.3f s   ratio %.2f\n' "import numpy, pandas" "$ma" "$mb" "$(echo "$mb / $ma" | bc -l)"

# A C build: zstd's library, whose sources come with the zstd-sys crate (fetched once).
zdir=/var/cache/velo-bench/zstd-lib
if [ ! -f "$zdir/.complete" ]; then
    rm -rf "$zdir"; mkdir -p "$zdir"
    proj=$(mktemp -d)
    mkdir -p "$proj/src"; echo 'fn main() {}' > "$proj/src/main.rs"
    printf '[package]\nname = "fetch-zstd"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nzstd-sys = "=2.0.16"\n' > "$proj/Cargo.toml"
    cargo fetch --quiet --manifest-path "$proj/Cargo.toml"
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/zstd-sys-2.0.16*/zstd/lib | tail -1)
    cp -r "$src" "$zdir/lib"
    cat > "$zdir/lib/Makefile" <<'MAKE'
SRCS := $(wildcard common/*.c compress/*.c decompress/*.c dictBuilder/*.c)
OBJS := $(SRCS:.c=.o)
CFLAGS := -O1 -DZSTD_DISABLE_ASM -DZSTD_MULTITHREAD=0 -I. -Icommon
libzstd.a: $(OBJS)
	$(AR) rcs $@ $^
clean:
	rm -f libzstd.a $(OBJS)
MAKE
    rm -rf "$proj"; touch "$zdir/.complete"
fi
cp -a "$zdir/lib" "$mnt/zstd"
"$velo" ingest "$mnt/zstd" --name zstd >/dev/null 2>&1
"$velo" run --manifest zstd -- /bin/true
ta=(); tb=()
crounds=$(( (runs + 1) / 2 ))
for _ in $(seq "$crounds"); do
    make -s -C "$mnt/zstd" clean >/dev/null
    ta+=("$(time_of make -s -j2 -C "$mnt/zstd")")
    tb+=("$(time_of "$velo" run --manifest zstd -- make -s -j2)")
done
ma=$(printf '%s\n' "${ta[@]}" | median)
mb=$(printf '%s\n' "${tb[@]}" | median)
printf '%-34s native %8.3f s   shim %8.3f s   ratio %.2f\n' "C build: make -j2 (zstd lib)" "$ma" "$mb" "$(echo "$mb / $ma" | bc -l)"

# Start-up: 101 runs each, alternated.
ta=(); tb=()
for _ in $(seq 101); do
    ta+=("$(time_of /bin/true)")
    tb+=("$(time_of "$velo" run --manifest kernel -- /bin/true)")
done
ma=$(printf '%s\n' "${ta[@]}" | median)
mb=$(printf '%s\n' "${tb[@]}" | median)
printf '%-34s native %8.4f s   shim %8.4f s   extra %.1f ms\n' "start-up: /bin/true" "$ma" "$mb" "$(echo "($mb - $ma) * 1000" | bc -l)"
echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
