#!/usr/bin/env bash
# Benchmarks of issue 3, each against a native baseline in the same run (medians, ratios):
#  1. velo checkout --mode hardlink of the kernel tree vs cp -al and ostree checkout -H
#     (same fresh loop ext4 file system for store, sources and destinations);
#  2. velo run --isolate --manifest busybox -- /bin/true on a cached farm vs
#     bwrap --unshare-all running the same /bin/true (start to exit);
#  3. the first run of a new tree, with its farm-building time reported separately.
# Usage: sudo bash scripts/bench_checkout_run.sh   (ROUNDS=5 RUNS=31 to change counts)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-5}
runs=${RUNS:-31}
[ "$(id -u)" = 0 ] || { echo "needs root (loop mounts)" >&2; exit 1; }
need=()
for p in linux-source-6.1 ostree bubblewrap busybox-static e2fsprogs; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet
velo=$PWD/target/release/velo

img=/var/tmp/velo-bench-co.img
mnt=/mnt/velo-bench-co
cleanup() { umount "$mnt" 2>/dev/null || true; rm -f "$img"; }
trap cleanup EXIT
umount "$mnt" 2>/dev/null || true
truncate -s 12G "$img"
mkfs.ext4 -q -F "$img"
mkdir -p "$mnt"
mount -o loop "$img" "$mnt"
echo "== machine: $(nproc) cores, $(uname -r), fresh loop ext4 at $mnt"

src=$mnt/linux
mkdir -p "$src"
tar -xf /usr/src/linux-source-6.1.tar.xz -C "$src" --strip-components=1
files=$(find "$src" -type f | wc -l)
echo "== kernel tree: $files files"
export VR_THE_SOURCE=$mnt/store
$velo ingest "$src" --name kernel >/dev/null 2>&1
ostree --repo="$mnt/repo" init --mode=bare-user
ostree --repo="$mnt/repo" commit -b kernel --tree=dir="$src" >/dev/null

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
warm() { tar -cf - -C "$src" . | cat >/dev/null; find "$mnt/store/blobs" -type f -print0 | xargs -0 cat >/dev/null; }

declare -A times
for ((r = 1; r <= rounds; r++)); do
    warm
    for who in velo cpal ostree; do
        dest=$mnt/out-$who
        rm -rf "$dest"; sync
        t0=$(now)
        case $who in
            velo) $velo checkout kernel "$dest" >/dev/null 2>&1 ;;
            cpal) cp -al "$src" "$dest" ;;
            ostree) ostree --repo="$mnt/repo" checkout -U -H kernel "$dest" ;;
        esac
        t1=$(now)
        times[$who]+="$(echo "$t1 - $t0" | bc) "
        rm -rf "$dest"
    done
done
v=$(echo ${times[velo]} | tr ' ' '\n' | median)
c=$(echo ${times[cpal]} | tr ' ' '\n' | median)
o=$(echo ${times[ostree]} | tr ' ' '\n' | median)
printf '== checkout of %s files, median of %s rounds (alternated)\n' "$files" "$rounds"
printf '%-34s %8.3f s\n' "velo checkout --mode hardlink" "$v" "cp -al" "$c" "ostree checkout -U -H" "$o"
printf 'ratio velo / cp -al:  %.2f   (target <= 1.0)\nratio velo / ostree: %.2f   (target < 1.0)\n' "$(echo "$v / $c" | bc -l)" "$(echo "$v / $o" | bc -l)"

# The sandbox start-to-exit.
bash scripts/setup_busybox.sh "$mnt/busybox.velo" >/dev/null
bbroot=$mnt/bbroot
$velo checkout busybox "$bbroot" >/dev/null 2>&1
first=$($velo --json run --isolate --manifest busybox -- /bin/true)
echo "== first run of a new tree: $(echo "$first" | tr -d '\n ' | sed 's/.*"farms_built":\(\[[^]]*\]\).*"run_seconds":\([0-9.e-]*\).*/farms built: \1; run itself: \2 s/')"
vr=(); bw=()
for ((i = 0; i < runs; i++)); do
    t0=$(now); $velo run --isolate --manifest busybox -- /bin/true; t1=$(now)
    vr+=("$(echo "$t1 - $t0" | bc)")
    t0=$(now); bwrap --unshare-all --ro-bind "$bbroot" / --proc /proc --dev /dev --tmpfs /tmp /bin/true; t1=$(now)
    bw+=("$(echo "$t1 - $t0" | bc)")
done
vm=$(printf '%s\n' "${vr[@]}" | median)
bm=$(printf '%s\n' "${bw[@]}" | median)
printf '== run /bin/true, median of %s runs (alternated)\n' "$runs"
printf '%-34s %8.4f s\n' "velo run --isolate (cached farm)" "$vm" "bwrap --unshare-all" "$bm"
printf 'ratio velo / bwrap: %.2f   (target <= 1.5)\n' "$(echo "$vm / $bm" | bc -l)"
