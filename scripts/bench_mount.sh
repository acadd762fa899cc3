#!/usr/bin/env bash
# Benchmark of `velo mount` (issue 11, read-only first slice), each against the same tree
# unpacked natively on the same fresh loop ext4, alternated (A B A B ...), medians and
# ratios:
#  1. `find TREE | wc -l`, warm;
#  2. `find TREE -type f | xargs stat --format=%s`, warm;
#  3. `cat` of every .c file, warm;
#  4. mount to the first `ls` (the tree is not walked up front).
# Usage: sudo bash scripts/bench_mount.sh      RUNS=7 (per contender)   SMALL=1 (fs/ only: CI)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-7}
img=/var/tmp/velo-bench-mount.img
mnt=/mnt/velo-bench-mount
fusemnt=/mnt/velo-bench-fuse
mkdir -p "$fusemnt"
packages="fuse3"
crates="-p velo-cli"
extra_cleanup() { "$velo" umount "$fusemnt" 2>/dev/null || true; }
# shellcheck source=scripts/bench_kernel_tree.sh
source scripts/bench_kernel_tree.sh

# Mount to first ls: the view exists already (built once per root, as for the shim).
"$velo" mount kernel "$fusemnt" >/dev/null 2>&1; "$velo" umount "$fusemnt"
tm=()
for _ in $(seq "$runs"); do
    s=$(date +%s.%N)
    "$velo" mount kernel "$fusemnt" >/dev/null 2>&1
    ls "$fusemnt" >/dev/null
    e=$(date +%s.%N)
    tm+=("$(echo "$e - $s" | bc)")
    "$velo" umount "$fusemnt"
done
printf '%-34s %8.3f s (median of %s)\n' "mount to first ls" "$(printf '%s\n' "${tm[@]}" | median)" "$runs"

"$velo" mount kernel "$fusemnt" >/dev/null 2>&1
bench() { # name, command with TREE standing for the tree's path
    local name=$1 cmd=$2 ta=() tb=() a b
    a=${cmd//TREE/$native}; b=${cmd//TREE/$fusemnt}
    bash -c "$a" >/dev/null 2>&1; bash -c "$b" >/dev/null 2>&1
    for _ in $(seq "$runs"); do
        ta+=("$(time_of bash -c "$a")")
        tb+=("$(time_of bash -c "$b")")
    done
    local ma mb
    ma=$(printf '%s\n' "${ta[@]}" | median)
    mb=$(printf '%s\n' "${tb[@]}" | median)
    printf '%-34s native %8.3f s   mount %8.3f s   ratio %.2f\n' "$name" "$ma" "$mb" "$(echo "$mb / $ma" | bc -l)"
}
bench "find | wc -l (warm)" "find TREE | wc -l"
bench "find -type f | xargs stat (warm)" "find TREE -type f -print0 | xargs -0 stat --format=%s"
bench "cat every .c file (warm)" "find TREE -name '*.c' -print0 | xargs -0 cat"
echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
