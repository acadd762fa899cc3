#!/usr/bin/env bash
# Benchmarks of issues 3 and 7, each against a native baseline in the same run (medians, ratios):
#  1. velo checkout --mode hardlink of the kernel tree vs cp -al and ostree checkout -H
#     (same fresh loop ext4 file system for store, sources and destinations);
#  2. the sandbox start-to-exit of /bin/true on a cached farm, three ways alternated
#     (A B C A B C ...): velo run --isolate --manifest busybox (a root name),
#     velo run --isolate --manifest busybox.velo (a file, unchanged since its first use:
#     the import cache answers), and bwrap --unshare-all over a checkout of the same tree;
#  3. the first run of a new tree, with its farm-building time reported separately.
# Usage: sudo bash scripts/bench_checkout_run.sh
#   ROUNDS=5 RUNS=31   counts (checkout rounds, sandbox runs per contender)
#   PARTS="checkout run"  which parts to run (PARTS=run skips the kernel tree)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-5}
runs=${RUNS:-31}
parts=${PARTS:-checkout run}
has() { [[ " $parts " == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || { echo "needs root (loop mounts)" >&2; exit 1; }
need=()
pkgs=(bubblewrap busybox-static e2fsprogs perl bc)
if has checkout; then pkgs+=(linux-source-6.1 ostree); fi
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet
velo=${CARGO_TARGET_DIR:-$PWD/target}/release/velo
[ -x "$velo" ] || { echo "no velo binary at $velo" >&2; exit 1; }

img=/var/tmp/velo-bench-co.img
mnt=/mnt/velo-bench-co
cleanup() { umount "$mnt" 2>/dev/null || true; rm -f "$img"; }
trap cleanup EXIT
umount "$mnt" 2>/dev/null || true
if has checkout; then truncate -s 12G "$img"; else truncate -s 1G "$img"; fi
mkfs.ext4 -q -F "$img"
mkdir -p "$mnt"
mount -o loop "$img" "$mnt"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), fresh loop ext4 at $mnt"
echo "== velo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(bwrap --version), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
export VR_THE_SOURCE=$mnt/store
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

if has checkout; then
    src=$mnt/linux
    mkdir -p "$src"
    tar -xf /usr/src/linux-source-6.1.tar.xz -C "$src" --strip-components=1
    files=$(find "$src" -type f | wc -l)
    echo "== kernel tree: $files files"
    $velo ingest "$src" --name kernel >/dev/null 2>&1
    ostree --repo="$mnt/repo" init --mode=bare-user
    ostree --repo="$mnt/repo" commit -b kernel --tree=dir="$src" >/dev/null

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
fi

# The sandbox start-to-exit.
has run || exit 0
# Times commands alternated (A B C A B C ...), each started by fork+exec from one perl
# process and timed to its exit: `date` in a subshell around each run would add two
# process starts of its own to every sample and blur the ratios.
alternate() {
    perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e '
        my $runs = shift; my @cmds = @ARGV; my @t = map { [] } @cmds;
        open(my $null, ">", "/dev/null") or die;
        for my $r (1 .. $runs) {
            for my $i (0 .. $#cmds) {
                my @argv = split " ", $cmds[$i];
                my $t0 = clock_gettime(CLOCK_MONOTONIC);
                my $pid = fork() // die "fork: $!";
                if ($pid == 0) { open(STDOUT, ">&", $null); exec { $argv[0] } @argv; exit 127 }
                waitpid($pid, 0);
                my $t1 = clock_gettime(CLOCK_MONOTONIC);
                die "$cmds[$i]: exit status $?\n" if $?;
                push @{$t[$i]}, $t1 - $t0;
            }
        }
        for my $i (0 .. $#cmds) {
            my @s = sort { $a <=> $b } @{$t[$i]}; my $n = @s;
            printf "%.6f\n", $n % 2 ? $s[($n - 1) / 2] : ($s[$n / 2 - 1] + $s[$n / 2]) / 2;
        }' "$@"
}
bash scripts/setup_busybox.sh "$mnt/busybox.velo" >/dev/null 2>&1
bbroot=$mnt/bbroot
$velo checkout busybox "$bbroot" >/dev/null 2>&1
first=$($velo --json run --isolate --manifest busybox -- /bin/true 2>/dev/null)
echo "== first run of a new tree: $(echo "$first" | tr -d '\n ' | sed 's/.*"farms_built":\(\[[^]]*\]\).*"run_seconds":\([0-9.e-]*\).*/farms built: \1; run itself: \2 s/')"
# A .velo changed under 2 s ago is verified on every use (a change within one timestamp
# tick could go unseen); after that its first run imports it and later runs reuse that.
sleep 2.1
$velo run --isolate --manifest "$mnt/busybox.velo" -- /bin/true
if VRIFT_DEBUG=debug $velo run --isolate --manifest "$mnt/busybox.velo" -- /bin/true 2>&1 | grep -q "import cache hit"; then
    echo "== busybox.velo: unchanged since its first run, not read again (import cache hit)"
else
    echo "== busybox.velo: WARNING: no import cache hit, every run reads and verifies the file"
fi
mapfile -t medians < <(alternate "$runs" \
    "$velo run --isolate --manifest busybox -- /bin/true" \
    "$velo run --isolate --manifest $mnt/busybox.velo -- /bin/true" \
    "bwrap --unshare-all --ro-bind $bbroot / --proc /proc --dev /dev --tmpfs /tmp /bin/true")
[ ${#medians[@]} = 3 ] || { echo "the timing loop failed" >&2; exit 1; }
vn=${medians[0]} vf=${medians[1]} bw=${medians[2]}
printf '== run /bin/true, median of %s runs each (alternated), load average after: %s\n' "$runs" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %8.4f s\n' "velo run --isolate --manifest busybox" "$vn" \
    "velo run --isolate --manifest busybox.velo" "$vf" "bwrap --unshare-all" "$bw"
printf 'ratio velo (name) / bwrap:  %.2f   (target <= 1.5)\n' "$(echo "$vn / $bw" | bc -l)"
printf 'ratio velo (.velo) / bwrap: %.2f   (target <= 1.5)\n' "$(echo "$vf / $bw" | bc -l)"
printf 'ratio .velo / name:         %.2f\n' "$(echo "$vf / $vn" | bc -l)"
