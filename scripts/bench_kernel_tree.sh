# Sourced by bench_shim.sh and bench_mount.sh: the kernel tree on a fresh loop ext4, its
# store beside it, and the timing helpers. Sets $velo, $mnt and $native; the caller sets
# $img, $mnt, $packages (beyond the kernel source), $crates (for cargo build) and may
# define extra_cleanup.
[ "$(id -u)" = 0 ] || { echo "needs root (loop mounts)" >&2; exit 1; }
need=()
for p in linux-source-6.1 e2fsprogs xz-utils bc $packages; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
# shellcheck disable=SC2086
cargo build --release --quiet $crates
velo=${CARGO_TARGET_DIR:-$PWD/target}/release/velo

cleanup() {
    if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
    umount "$mnt" 2>/dev/null || true
    rm -f "$img"
}
trap cleanup EXIT
umount "$mnt" 2>/dev/null || true
truncate -s 6G "$img"
mkfs.ext4 -q -F "$img"
mkdir -p "$mnt"
mount -o loop "$img" "$mnt"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), fresh loop ext4 at $mnt"
echo "== velo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
export VR_THE_SOURCE=$mnt/store
mkdir -p "$mnt/src"
tar -xf /usr/src/linux-source-6.1.tar.xz -C "$mnt/src"
native=$mnt/src/linux-source-6.1
if [ "${SMALL:-0}" = 1 ]; then native=$native/fs; fi
echo "== tree: $native ($(find "$native" -type f | wc -l) files)"
"$velo" ingest "$native" --name kernel >/dev/null 2>&1

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
time_of() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
