#!/usr/bin/env bash
# fsx (`cargo install fsx`) on `velo mount`, the long run: every operation fsx has (mmap
# reads and writes, truncate, fallocate, punch hole, copy_file_range, sendfile, fsync),
# OPS operations per seed, on a tree file of the mount, with a remount in the middle. Each
# seed's run is repeated natively on ext4 and the bytes compared:
#   1. the first half of the operations on the mount (a kept --upper), the same natively;
#   2. velo umount, velo mount again (same --upper): the file must equal the native one;
#   3. the second half on the remounted file, the same natively (each half as fsx runs of
#      CHUNK operations with their own seeds; fsx's own -b continuation is not used: in
#      fsx 0.3.2 it breaks with copy_file_range even natively);
#   4. the files must be equal; velo commit, and the committed file must equal them too.
# fsx checks every read against its model as it goes (any miscompare fails the run).
#
#   sudo bash scripts/fsx_mount.sh        OPS=1000000 (default) SEEDS="1 2 3" (default)
#   FSYNC=0: without fsync and fdatasync (on a loop device each is a flush to the disk
#   below: with them, 500,000 native operations took over 50 minutes here)
#   NATIVE=0: no native runs (fsx checks every read against its own model all the same);
#   the file after the remount is compared with the one before it, the committed file
#   with the mount's
# CI runs a shorter pass as a test (crates/velo-cli/tests/mount_writes.rs, 10,000 operations).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (a loop ext4)" >&2; exit 1; }
ops=${OPS:-1000000}
seeds=${SEEDS:-1 2 3}
# fsx 0.3.2 leaves every mapping it makes in place (55,000 of the test file after about
# 300,000 operations here): each msync and truncation then walks them all, and mmap fails
# at vm.max_map_count. So a seed's operations run as fsx processes of CHUNK operations
# each (chunk i with seed SEED + 1000 i) on the same file.
chunk=${CHUNK:-100000}
chunks=$(( (ops + chunk - 1) / chunk ))
[ "$chunks" -ge 2 ] || chunks=2
chunk=$(( ops / chunks ))
half=$(( chunks / 2 ))
fsx=$(command -v fsx || echo "$HOME/.cargo/bin/fsx")
[ -x "$fsx" ] || cargo install --locked fsx
if [ -z "${VELO:-}" ]; then
    cargo build --release --quiet -p velo-cli
    VELO=${CARGO_TARGET_DIR:-$PWD/target}/release/velo
fi
work=${FSX_WORK:-/var/tmp/velo-fsx}
img=$work/ext4.img
fs=$work/fs
mkdir -p "$work" "$fs"
cleanup() {
    "$VELO" --store "$fs/store" umount "$fs/mnt" 2>/dev/null || true
    umount "$fs" 2>/dev/null || true
    rm -f "$img"
}
trap cleanup EXIT
umount "$fs" 2>/dev/null || true
truncate -s 4G "$img"
mkfs.ext4 -q -F "$img"
mount -o loop "$img" "$fs"
cat > "$fs/fsx.toml" <<EOF
[weights]
close_open = 2
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 2
fsync = ${FSYNC:-1}
fdatasync = ${FSYNC:-1}
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
EOF
mkdir -p "$fs/src" "$fs/mnt" "$fs/artifacts"
head -c 262144 /dev/urandom > "$fs/src/testfile"
velo() { "$VELO" --store "$fs/store" "$@"; }
velo ingest "$fs/src" --name fsx >/dev/null 2>&1
echo "== fsx $("$fsx" --version 2>/dev/null | head -1), $ops operations per seed ($chunks runs of $chunk), seeds: $seeds; velo $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(nproc) cores, $(uname -r)"
run_fsx() { # dir, fsx arguments...
    local dir=$1; shift
    (cd "$dir" && "$fsx" -f "$fs/fsx.toml" -P "$fs/artifacts" "$@" testfile) > "$fs/artifacts/last.log" 2>&1 || {
        tail -n 30 "$fs/artifacts/last.log" >&2
        return 1
    }
    grep -q "All operations completed A-OK!" "$fs/artifacts/last.log"
}
status=0
native_runs=${NATIVE:-1}
for seed in $seeds; do
    failed_before=$status status=0
    native=$fs/native-$seed upper=$fs/upper-$seed
    native_time=0
    if [ "$native_runs" = 1 ]; then
        mkdir -p "$native"
        cp "$fs/src/testfile" "$native/testfile"
        s=$(date +%s.%N)
        for i in $(seq 0 $((chunks - 1))); do
            run_fsx "$native" -S $((seed + 1000 * i)) -N "$chunk"
            if [ "$i" = $((half - 1)) ]; then cp "$native/testfile" "$fs/native-half-$seed"; fi
        done
        native_time=$(echo "$(date +%s.%N) - $s" | bc)
    fi

    s=$(date +%s.%N)
    velo mount fsx "$fs/mnt" --upper "$upper" >/dev/null 2>&1
    for i in $(seq 0 $((half - 1))); do
        run_ok=1; run_fsx "$fs/mnt" -S $((seed + 1000 * i)) -N "$chunk" || { status=1 run_ok=0; }
        echo "   seed $seed, run $((i + 1)) of $chunks on the mount: $([ $run_ok = 1 ] && echo ok || echo FAILED) ($(date +%T))"
    done
    if [ "$native_runs" != 1 ]; then cp "$fs/mnt/testfile" "$fs/native-half-$seed"; fi
    velo umount "$fs/mnt"
    velo mount fsx "$fs/mnt" --upper "$upper" >/dev/null 2>&1
    if ! cmp -s "$fs/mnt/testfile" "$fs/native-half-$seed"; then
        echo "seed $seed: after the remount the file differs from the $([ "$native_runs" = 1 ] && echo 'native run' || echo 'one before it')" >&2
        status=1
    fi
    for i in $(seq "$half" $((chunks - 1))); do
        run_ok=1; run_fsx "$fs/mnt" -S $((seed + 1000 * i)) -N "$chunk" || { status=1 run_ok=0; }
        echo "   seed $seed, run $((i + 1)) of $chunks on the mount (after the remount): $([ $run_ok = 1 ] && echo ok || echo FAILED) ($(date +%T))"
    done
    mount_time=$(echo "$(date +%s.%N) - $s" | bc)
    if [ "$native_runs" != 1 ]; then mkdir -p "$native"; cp "$fs/mnt/testfile" "$native/testfile"; fi
    if ! cmp -s "$fs/mnt/testfile" "$native/testfile"; then
        echo "seed $seed: the mount's file differs from the native run's" >&2
        status=1
    fi
    velo commit "$fs/mnt" --name "fsx-$seed" >/dev/null
    velo umount "$fs/mnt"
    if ! cmp -s <(velo cat "fsx-$seed" testfile) "$native/testfile"; then
        echo "seed $seed: the committed file differs from the $([ "$native_runs" = 1 ] && echo "native run's" || echo "mount's")" >&2
        status=1
    fi
    if [ "$native_runs" = 1 ]; then
        printf 'seed %s: native %8.1f s   velo mount (with a remount) %8.1f s   ratio %.2f   %s\n' \
            "$seed" "$native_time" "$mount_time" "$(echo "$mount_time / $native_time" | bc -l)" \
            "$([ $status = 0 ] && echo 'identical, no miscompare' || echo FAILED)"
    else
        printf 'seed %s: velo mount (with a remount) %8.1f s   %s\n' "$seed" "$mount_time" \
            "$([ $status = 0 ] && echo 'no miscompare, equal across the remount and in the commit' || echo FAILED)"
    fi
    if [ "$failed_before" != 0 ]; then status=1; fi
done
velo fsck >/dev/null && echo "== velo fsck: clean"
exit "$status"
