#!/usr/bin/env bash
# Benchmarks `velo ingest` against native baselines, all in one run, as ratios.
#
#   sudo bash scripts/bench_ingest.sh            # ROUNDS=3 by default
#   sudo ROUNDS=5 bash scripts/bench_ingest.sh
#
# Needs root (loop mounts). Environment:
#   ROUNDS      rounds; each round runs every contender once, order reversed on even rounds
#               (A B C, C B A, ...); the table reports medians over rounds (default 3)
#   BENCH_DIR   scratch directory for images and results (default /var/tmp/velo-bench);
#               the unpacked source image is cached there between runs
#   SOURCE_TAR  the tree to ingest (default /usr/src/linux-source-6.1.tar.xz)
#   SKIP_BUILD  1 = use the existing target/release/velo instead of building
#   SETS        which file systems to run, of "ext4 btrfs xfs" (default: all three)
#
# What it measures (details and results: docs/BENCHMARKS.md):
#   1. ingest into an empty store on a freshly made loop ext4 (one mkfs per contender run):
#      velo ingest, velo ingest --no-sync, cp -a, cp -a + syncfs, b3sum, git add, ostree commit
#   2. the same on a freshly made loop btrfs (reflinks): velo ingest [--no-sync] vs
#      cp -a --reflink=always [+ syncfs]; the source lives on the same btrfs
#   2b. the same on a freshly made loop xfs (-m reflink=1)
#   3. re-ingest of the unchanged tree (stat cache warm) vs a find -printf walk; git status
#   4. peak RSS of velo ingest: the kernel tree vs 4 files x 512 MiB (random bytes)
# Every run starts with a global sync and the source re-read (warm page cache). Runs are timed with
# $EPOCHREALTIME; CPU (user+sys) and max RSS come from /usr/bin/time.
set -euo pipefail
export LC_ALL=C

repo=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
SETS=${SETS:-ext4 btrfs xfs}
BENCH_DIR=${BENCH_DIR:-/var/tmp/velo-bench}
SOURCE_TAR=${SOURCE_TAR:-/usr/src/linux-source-6.1.tar.xz}
HUGE_FILES=4
HUGE_MIB=512

die() { echo "bench_ingest: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (sudo bash $0): it needs loop mounts"
[ -r "$SOURCE_TAR" ] || die "$SOURCE_TAR not found (apt-get install linux-source-6.1)"
case $ROUNDS in '' | *[!0-9]* | 0) die "ROUNDS must be a positive integer" ;; esac

# --- tools -----------------------------------------------------------------------------
need=(e2fsprogs btrfs-progs xfsprogs util-linux time b3sum ostree git xz-utils tar python3 coreutils findutils)
if command -v apt-get >/dev/null; then
    missing=()
    for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
for t in mkfs.ext4 mkfs.btrfs mkfs.xfs btrfs losetup /usr/bin/time b3sum ostree git xz python3; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

# --- scratch layout and cleanup --------------------------------------------------------
mkdir -p "$BENCH_DIR"/mnt/{src,ext4,btrfs,xfs}
W=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
SRC_MNT=$BENCH_DIR/mnt/src
E4=$BENCH_DIR/mnt/ext4
BT=$BENCH_DIR/mnt/btrfs
XF=$BENCH_DIR/mnt/xfs
RESULTS=$W/results.tsv
cleanup() {
    for m in "$XF" "$BT" "$E4" "$SRC_MNT"; do
        if mountpoint -q "$m"; then umount "$m" || umount -l "$m"; fi
    done
    rm -f "$BENCH_DIR/ext4.img" "$BENCH_DIR/btrfs.img" "$BENCH_DIR/xfs.img"
}
trap cleanup EXIT

# --- build -----------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "== cargo build --release"
    if command -v cargo >/dev/null; then
        (cd "$repo" && cargo build --release --quiet -p velo-cli)
    elif [ -n "${SUDO_USER:-}" ]; then
        sudo -u "$SUDO_USER" -H bash -lc "cd '$repo' && cargo build --release --quiet -p velo-cli"
    else
        die "cargo not found"
    fi
fi
# A private copy, so a concurrent rebuild cannot swap the binary mid-run.
cp "$repo/target/release/velo" "$W/velo"
VELO=$W/velo
velo_rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$repo" diff --quiet HEAD -- crates 2>/dev/null || velo_rev="$velo_rev+uncommitted changes in crates/"

# --- the source: unpacked once into a cached ext4 image, mounted read-only -------------
src_img=$BENCH_DIR/source-ext4.img
src_tag="$(basename "$SOURCE_TAR") $(stat -c '%s %Y' "$SOURCE_TAR") huge=${HUGE_FILES}x${HUGE_MIB}M"
if ! { [ -f "$src_img" ] && [ "$(cat "$src_img.ok" 2>/dev/null)" = "$src_tag" ]; }; then
    echo "== unpacking $SOURCE_TAR into $src_img (once; cached)"
    rm -f "$src_img" "$src_img.ok"
    truncate -s 8G "$src_img"
    mkfs.ext4 -q -F -L velo-src "$src_img"
    mount -o loop "$src_img" "$SRC_MNT"
    mkdir "$SRC_MNT/tree" "$SRC_MNT/huge"
    xz -T2 -dc "$SOURCE_TAR" | tar -x -C "$SRC_MNT/tree"
    for i in $(seq 1 $HUGE_FILES); do
        head -c $((HUGE_MIB << 20)) /dev/urandom >"$SRC_MNT/huge/file$i"
    done
    umount "$SRC_MNT"
    echo "$src_tag" >"$src_img.ok"
fi
mountpoint -q "$SRC_MNT" && umount "$SRC_MNT" # left mounted by hand or by a killed run
mount -o loop,ro,noatime "$src_img" "$SRC_MNT"
SRC=
for d in "$SRC_MNT"/tree/*/; do SRC=${d%/}; break; done
HUGE=$SRC_MNT/huge
[ -n "$SRC" ] && [ -d "$SRC" ] || die "no tree in $src_img; delete it to unpack again"
src_files=$(find "$SRC" -type f | wc -l)
src_bytes=$(du -sb --apparent-size "$SRC" | cut -f1)

# --- helpers ---------------------------------------------------------------------------
# Before every timed run: flush all dirty data first (the loop images are buffered files
# on the root file system, whose writeback from earlier runs would otherwise land in this
# one), then re-read the source so the page cache is warm.
warm() {
    sync
    for d in "$@"; do tar -C "$d" -cf - . | cat >/dev/null; done
}

fresh_ext4() {
    mountpoint -q "$E4" && umount "$E4"
    rm -f "$BENCH_DIR/ext4.img"  # dropping the image drops its dirty pages unwritten
    truncate -s 16G "$BENCH_DIR/ext4.img"
    mkfs.ext4 -q -F "$BENCH_DIR/ext4.img"
    # noinit_itable: no ext4lazyinit thread zeroing inode tables under the benchmark
    mount -o loop,noinit_itable "$BENCH_DIR/ext4.img" "$E4"
}

# One fresh btrfs per script run; the source is copied onto it (reflinks only work within
# one file system) and each contender run writes into a fresh subvolume, deleted afterwards
# (and the deletion committed and cleaned) before the next run.
fresh_btrfs() {
    mountpoint -q "$BT" && umount "$BT"
    rm -f "$BENCH_DIR/btrfs.img"
    truncate -s 16G "$BENCH_DIR/btrfs.img"
    mkfs.btrfs -q -f "$BENCH_DIR/btrfs.img" >/dev/null 2>&1
    mount -o loop "$BENCH_DIR/btrfs.img" "$BT"
    cp -a "$SRC" "$BT/src"
    sync -f "$BT/src"
}
btrfs_out() { btrfs -q subvolume create "$BT/out" >/dev/null; }
btrfs_clean() {
    btrfs -q subvolume delete "$BT/out" >/dev/null
    sync -f "$BT"
    btrfs -q subvolume sync "$BT" >/dev/null
}

# One fresh xfs (reflink=1) per script run, the source copied onto it; each contender run
# writes into a new directory, removed (and the removal flushed) before the next run.
fresh_xfs() {
    mountpoint -q "$XF" && umount "$XF"
    rm -f "$BENCH_DIR/xfs.img"
    truncate -s 16G "$BENCH_DIR/xfs.img"
    mkfs.xfs -q -f -m reflink=1 "$BENCH_DIR/xfs.img"
    mount -o loop "$BENCH_DIR/xfs.img" "$XF"
    cp -a "$SRC" "$XF/src"
    sync -f "$XF/src"
}
xfs_out() { mkdir "$XF/out"; }
xfs_clean() {
    rm -rf "$XF/out"
    sync -f "$XF"
    sleep 2 # let inode inactivation finish before the next run
}

# timed LABEL ROUND CMD...: appends "label round wall cpu rss load" to $RESULTS
timed() {
    local label=$1 round=$2
    shift 2
    local load t0 t1
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$EPOCHREALTIME
    if ! /usr/bin/time -f '%U %S %M' -o "$W/time.out" "$@" >"$W/out.$label" 2>"$W/err.$label"; then
        cat "$W/err.$label" >&2
        die "$label failed: $*"
    fi
    t1=$EPOCHREALTIME
    read -r u s m < <(tail -n 1 "$W/time.out")
    awk -v l="$label" -v r="$round" -v t0="$t0" -v t1="$t1" -v u="$u" -v s="$s" -v m="$m" -v ld="$load" \
        'BEGIN { printf "%s\t%s\t%.4f\t%.2f\t%s\t%s\n", l, r, t1 - t0, u + s, m, ld }' >>"$RESULTS"
    printf '   %-28s %8.3f s\n' "$label" "$(tail -n 1 "$RESULTS" | cut -f3)"
}

json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
check_velo() { # LABEL EXPECTED-FILES [cached|reflinked]
    local f=$W/out.$1
    [ "$(json_field "$f" files)" = "$2" ] || die "$1: ingested $(json_field "$f" files) files, expected $2"
    case ${3:-} in
        cached) [ "$(json_field "$f" cached_files)" = "$2" ] || die "$1: only $(json_field "$f" cached_files) of $2 files came from the stat cache" ;;
        reflinked) [ "$(json_field "$f" reflinked)" = True ] || die "$1: blobs were not reflinked" ;;
    esac
    return 0
}

# --- contenders ------------------------------------------------------------------------
# Each ext4 contender gets its own freshly made file system.
e4_velo() {
    fresh_ext4; warm "$SRC"
    timed "ext4 velo ingest" "$1" "$VELO" --store "$E4/store" ingest "$SRC" --json
    check_velo "ext4 velo ingest" "$src_files"
    # Re-ingest (stat cache warm) vs a find walk, alternating which goes first. The source
    # is far older than the 2 s the stat cache requires.
    warm "$SRC"
    local pair=(reingest find)
    (($1 % 2)) || pair=(find reingest)
    for c in "${pair[@]}"; do
        if [ "$c" = reingest ]; then
            timed "re-ingest velo" "$1" "$VELO" --store "$E4/store" ingest "$SRC" --json
            check_velo "re-ingest velo" "$src_files" cached
        else
            timed "re-ingest find -printf" "$1" find "$SRC" -printf '%s %T@\n'
        fi
    done
}
e4_velo_nosync() {
    fresh_ext4; warm "$SRC"
    timed "ext4 velo ingest --no-sync" "$1" "$VELO" --store "$E4/store" ingest "$SRC" --json --no-sync
    check_velo "ext4 velo ingest --no-sync" "$src_files"
}
e4_cp() {
    fresh_ext4; warm "$SRC"
    timed "ext4 cp -a" "$1" cp -a "$SRC" "$E4/copy"
}
e4_cp_sync() {
    fresh_ext4; warm "$SRC"
    timed "ext4 cp -a + syncfs" "$1" bash -c 'cp -a "$1" "$2" && sync -f "$2"' _ "$SRC" "$E4/copy"
}
e4_b3sum() {
    warm "$SRC"
    timed "b3sum --num-threads 2" "$1" bash -c \
        'find "$1" -type f -print0 | xargs -0 b3sum --num-threads 2 >/dev/null' _ "$SRC"
}
e4_git() {
    fresh_ext4; warm "$SRC"
    # -f: Debian's linux-source ships a .gitignore that ignores everything.
    timed "ext4 git init + add -A" "$1" bash -c \
        'git init -q --bare "$2" && git --git-dir="$2" --work-tree="$1" -C "$1" add -A -f' _ "$SRC" "$E4/g"
    # No auto gc/maintenance: it would detach and repack under the following runs.
    local g=(git -c gc.auto=0 -c maintenance.auto=false --git-dir="$E4/g" --work-tree="$SRC" -C "$SRC")
    "${g[@]}" -c user.name=bench -c user.email=bench@localhost commit -q -m bench
    warm "$SRC"
    "${g[@]}" status --porcelain >/dev/null # refreshes the index once, like the first ingest's stat cache
    timed "re-ingest git status" "$1" "${g[@]}" status --porcelain
    [ ! -s "$W/out.re-ingest git status" ] || die "git status reports changes"
}
e4_ostree() {
    fresh_ext4; warm "$SRC"
    timed "ext4 ostree commit" "$1" bash -c \
        'ostree --repo="$2" init --mode=bare-user && ostree --repo="$2" commit -b b --tree=dir="$1"' _ "$SRC" "$E4/repo"
}
e4_huge() {
    fresh_ext4; warm "$HUGE"
    # --no-sync: peak memory does not depend on the final syncfs, and 2 GiB of syncfs
    # would only add minutes of disk time to the run.
    timed "rss velo ingest 4x512MiB" "$1" "$VELO" --store "$E4/store" ingest "$HUGE" --json --no-sync
    check_velo "rss velo ingest 4x512MiB" "$HUGE_FILES"
}
bt_velo() {
    btrfs_out; warm "$BT/src"
    timed "btrfs velo ingest" "$1" "$VELO" --store "$BT/out/store" ingest "$BT/src" --json
    check_velo "btrfs velo ingest" "$src_files" reflinked
    btrfs_clean
}
bt_velo_nosync() {
    btrfs_out; warm "$BT/src"
    timed "btrfs velo ingest --no-sync" "$1" "$VELO" --store "$BT/out/store" ingest "$BT/src" --json --no-sync
    check_velo "btrfs velo ingest --no-sync" "$src_files" reflinked
    btrfs_clean
}
bt_cp() {
    btrfs_out; warm "$BT/src"
    timed "btrfs cp -a --reflink=always" "$1" cp -a --reflink=always "$BT/src" "$BT/out/copy"
    btrfs_clean
}
bt_cp_sync() {
    btrfs_out; warm "$BT/src"
    timed "btrfs cp -a --reflink + syncfs" "$1" bash -c \
        'cp -a --reflink=always "$1" "$2" && sync -f "$2"' _ "$BT/src" "$BT/out/copy"
    btrfs_clean
}
xf_velo() {
    xfs_out; warm "$XF/src"
    timed "xfs velo ingest" "$1" "$VELO" --store "$XF/out/store" ingest "$XF/src" --json
    check_velo "xfs velo ingest" "$src_files" reflinked
    xfs_clean
}
xf_velo_nosync() {
    xfs_out; warm "$XF/src"
    timed "xfs velo ingest --no-sync" "$1" "$VELO" --store "$XF/out/store" ingest "$XF/src" --json --no-sync
    check_velo "xfs velo ingest --no-sync" "$src_files" reflinked
    xfs_clean
}
xf_cp() {
    xfs_out; warm "$XF/src"
    timed "xfs cp -a --reflink=always" "$1" cp -a --reflink=always "$XF/src" "$XF/out/copy"
    xfs_clean
}
xf_cp_sync() {
    xfs_out; warm "$XF/src"
    timed "xfs cp -a --reflink + syncfs" "$1" bash -c \
        'cp -a --reflink=always "$1" "$2" && sync -f "$2"' _ "$XF/src" "$XF/out/copy"
    xfs_clean
}

ext4_set=(e4_velo e4_cp e4_velo_nosync e4_cp_sync e4_b3sum e4_git e4_ostree e4_huge)
btrfs_set=(bt_velo bt_cp bt_velo_nosync bt_cp_sync)
xfs_set=(xf_velo xf_cp xf_velo_nosync xf_cp_sync)

# --- machine ---------------------------------------------------------------------------
started=$EPOCHREALTIME
{
    echo "date:        $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "velo:        $velo_rev"
    echo "cpu:         $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "memory:      $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "kernel:      $(uname -r)"
    echo "backing fs:  $(df -T "$BENCH_DIR" | awk 'NR==2 {print $2, "(" $1 ")"}') holds the loop images (buffered loop devices)"
    echo "store fs:    fresh loop ext4 per run ($(mkfs.ext4 -V 2>&1 | head -n 1 | cut -d' ' -f1-2), defaults, 16 GiB, mounted noinit_itable);"
    echo "             one fresh loop btrfs per script run, a fresh subvolume per contender run ($(btrfs --version | cut -d' ' -f2), defaults, 16 GiB)"
    echo "             one fresh loop xfs per script run, a fresh directory per contender run ($(mkfs.xfs -V | awk '{print $NF}'), -m reflink=1, 16 GiB)"
    echo "sets:        $SETS"
    echo "source:      $(basename "$SOURCE_TAR"): $src_files files, $src_bytes bytes, on a loop ext4 mounted ro (btrfs: a copy on the btrfs)"
    echo "tools:       $(cp --version | head -n 1), $(b3sum --version), $(git --version), ostree $(ostree --version | awk -F"'" '/Version/ {print $2}')"
    echo "rounds:      $ROUNDS (order reversed on even rounds); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$W/machine.txt"

in_sets() { case " $SETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for r in $(seq 1 "$ROUNDS"); do
    echo "== round $r/$ROUNDS"
    e=("${ext4_set[@]}")
    b=("${btrfs_set[@]}")
    x=("${xfs_set[@]}")
    if ((r % 2 == 0)); then
        mapfile -t e < <(printf '%s\n' "${ext4_set[@]}" | tac)
        mapfile -t b < <(printf '%s\n' "${btrfs_set[@]}" | tac)
        mapfile -t x < <(printf '%s\n' "${xfs_set[@]}" | tac)
    fi
    if in_sets ext4; then
        for c in "${e[@]}"; do "$c" "$r"; done
        mountpoint -q "$E4" && umount "$E4"
        rm -f "$BENCH_DIR/ext4.img"
    fi
    if in_sets btrfs; then
        mountpoint -q "$BT" || fresh_btrfs
        for c in "${b[@]}"; do "$c" "$r"; done
    fi
    if in_sets xfs; then
        mountpoint -q "$XF" || fresh_xfs
        for c in "${x[@]}"; do "$c" "$r"; done
    fi
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg); total $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", b - a}') s" | tee -a "$W/machine.txt"

# --- summary ---------------------------------------------------------------------------
python3 - "$RESULTS" "$src_files" "$src_bytes" "$HUGE_FILES" "$HUGE_MIB" <<'EOF' | tee "$W/summary.txt"
import sys, statistics as st
from collections import defaultdict
path, files, nbytes, hn, hmib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
runs = defaultdict(dict)  # label -> round -> (wall, cpu, rss, load)
for line in open(path):
    l, r, wall, cpu, rss, load = line.rstrip("\n").split("\t")
    runs[l][int(r)] = (float(wall), float(cpu), int(rss), float(load))
med = lambda l, i=0: st.median(v[i] for v in runs[l].values())
def paired(a, b):  # median over rounds of a/b within the same round
    return st.median(runs[a][r][0] / runs[b][r][0] for r in runs[a] if r in runs[b])

groups = [
    ("Ingest into an empty store, loop ext4 (baseline: cp -a)", "ext4 cp -a",
     ["ext4 cp -a", "ext4 cp -a + syncfs", "ext4 velo ingest", "ext4 velo ingest --no-sync",
      "b3sum --num-threads 2", "ext4 git init + add -A", "ext4 ostree commit"]),
    ("Ingest into an empty store, loop btrfs, reflinks (baseline: cp -a --reflink=always)", "btrfs cp -a --reflink=always",
     ["btrfs cp -a --reflink=always", "btrfs cp -a --reflink + syncfs", "btrfs velo ingest", "btrfs velo ingest --no-sync"]),
    ("Ingest into an empty store, loop xfs, reflinks (baseline: cp -a --reflink=always)", "xfs cp -a --reflink=always",
     ["xfs cp -a --reflink=always", "xfs cp -a --reflink + syncfs", "xfs velo ingest", "xfs velo ingest --no-sync"]),
    ("Re-ingest of the unchanged tree (baseline: find -printf '%s %T@\\n')", "re-ingest find -printf",
     ["re-ingest find -printf", "re-ingest velo", "re-ingest git status"]),
]
print()
print(f"{'contender':34} {'n':>2} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s':>7} {'maxRSS MiB':>10} {'ratio':>6} {'paired':>6}")
for title, base, labels in groups:
    if base not in runs: continue
    print(f"-- {title}")
    for l in labels:
        if l not in runs: continue
        walls = [v[0] for v in runs[l].values()]
        print(f"{l:34} {len(walls):>2} {med(l):>9.3f} {min(walls):>8.3f} {max(walls):>8.3f} {med(l,1):>7.2f} "
              f"{med(l,2)/1024:>10.1f} {med(l)/med(base):>6.2f} {paired(l, base):>6.2f}")
print("ratio = median / baseline median; paired = median over rounds of (run / same-round baseline run)")

print()
print("-- Targets")
def target(name, a, b, limit):
    if a not in runs or b not in runs: return
    r, p = med(a) / med(b), paired(a, b)
    ok = "MET" if r <= limit else "NOT MET"
    print(f"{name:58} ratio {r:5.2f} (paired {p:5.2f})  target <= {limit:.1f}: {ok}")
target("velo ingest (default, syncfs) / cp -a, ext4", "ext4 velo ingest", "ext4 cp -a", 1.0)
target("velo ingest --no-sync / cp -a, ext4", "ext4 velo ingest --no-sync", "ext4 cp -a", 1.0)
target("velo ingest (default) / cp -a + syncfs, ext4", "ext4 velo ingest", "ext4 cp -a + syncfs", 1.0)
target("velo ingest / cp -a --reflink=always, btrfs", "btrfs velo ingest", "btrfs cp -a --reflink=always", 1.0)
target("velo ingest --no-sync / cp -a --reflink=always, btrfs", "btrfs velo ingest --no-sync", "btrfs cp -a --reflink=always", 1.0)
target("velo ingest / cp -a --reflink + syncfs, btrfs", "btrfs velo ingest", "btrfs cp -a --reflink + syncfs", 1.0)
target("velo ingest / cp -a --reflink=always, xfs", "xfs velo ingest", "xfs cp -a --reflink=always", 1.0)
target("velo ingest --no-sync / cp -a --reflink=always, xfs", "xfs velo ingest --no-sync", "xfs cp -a --reflink=always", 1.0)
target("velo re-ingest / find -printf", "re-ingest velo", "re-ingest find -printf", 2.0)
if "ext4 velo ingest" in runs and "rss velo ingest 4x512MiB" in runs:
  print()
  print("-- Peak memory of velo ingest (median max RSS)")
  k, h = med("ext4 velo ingest", 2), med("rss velo ingest 4x512MiB", 2)
  print(f"kernel tree: {files} files, {nbytes/2**20:.0f} MiB  -> {k/1024:.1f} MiB  (velo ingest, default)")
  print(f"huge files:  {hn} files, {hn*hmib} MiB      -> {h/1024:.1f} MiB  (velo ingest --no-sync, wall {med('rss velo ingest 4x512MiB'):.3f} s)")
  print(f"-> {hn*hmib/(nbytes/2**20):.1f}x the bytes, {files//hn}x fewer files: RSS {h/k:.2f}x")
print()
print("median load average (1 min) when runs started: " + f"{st.median(v[3] for l in runs for v in runs[l].values()):.2f}")
EOF
echo "raw results: $RESULTS"
