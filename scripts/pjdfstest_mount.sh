#!/usr/bin/env bash
# POSIX conformance of `velo mount`: runs pjdfstest (the Rust port, `cargo install pjdfstest`)
# on a fresh loop ext4 (the baseline) and on a velo mount whose store and upper live on that
# ext4, and fails if a test passes on ext4 but not on the mount, unless
# scripts/pjdfstest_exceptions.txt lists it (one test name and its reason a line).
#
#   sudo bash scripts/pjdfstest_mount.sh [-o OUT_DIR] [--repeat N] [--no-unpriv] [--no-passthrough] [--verify-char] [PATTERN...]
#
# Runs, each on the same loop ext4:
#   ext4-root, velo-root       as root (pjdfstest switches to `nobody` and `tests` for the
#                              permission tests; the mount has --allow-other)
#   velo-root-treedir          as root, inside a directory of the served tree (not yet in
#                              the upper: the first change copies it up)
#   velo-root-passthrough      as root, on a mount with --passthrough (the kernel reads tree
#                              files from their blobs and reads and writes upper files
#                              itself; --no-passthrough: skip)
#   ext4-user, velo-user       as the unprivileged user `tests`, which mounts through
#                              fusermount3 itself (no --allow-other, so no user_allow_other
#                              needed); pjdfstest skips its root-only tests. Needs /dev/fuse
#                              open to everyone (Debian's udev default, 0666): if it is not,
#                              it is made 0666 for the run and restored (--no-unpriv: skip).
# The EROFS tests remount the file system read-only and back, which fails ("busy") when they
# run inside the full suite on ext4, so they get their own pjdfstest run per file system, with
# a `mount` on PATH that adds -i (mount(8) would otherwise hand the FUSE remount to a
# mount.fuse helper that runs the file system's "source", `velo`, as a program).
# --repeat N (default 3): each velo run is the suite N times; a test failing in any of them
# fails (a race such as open::etxtbsy's shows in some runs only; the comparison says k/N).
# PATTERN: only the tests whose names contain it (pjdfstest's filter).
# --verify-char: pjdfstest makes every character device as 0/0, which velo refuses by design
# (the upper format's whiteout); this builds pjdfstest again with 1/3 instead and runs the
# ::char tests on both, so the exceptions hide only that refusal.
#
# Environment: VELO (a velo binary; default: cargo build --release -p velo-cli, honouring
# CARGO_TARGET_DIR), PJDFSTEST (default: pjdfstest on PATH or ~/.cargo/bin), PJD_WORK (image
# and caches, default /var/tmp/velo-pjdfstest), PJD_USER (default tests; created if missing).
# Results: OUT_DIR (default target/pjdfstest) gets <run>.log (pjdfstest's output) and
# <run>.results ("test status" a line) for each run, and comparison.txt.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=$repo/target/pjdfstest
unpriv=1
repeat=3
verify_char=0
passthrough=1
patterns=()
while [ $# -gt 0 ]; do
    case $1 in
        -o) out=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --no-unpriv) unpriv=0; shift ;;
        --no-passthrough) passthrough=0; shift ;;
        --verify-char) verify_char=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) patterns+=("$1"); shift ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (loop mount, pjdfstest's user switches)" >&2; exit 1; }

work=${PJD_WORK:-/var/tmp/velo-pjdfstest}
img=$work/ext4.img
mnt=$work/ext4       # the loop ext4
sec=$work/secondary  # a tmpfs: the "other file system" of the EXDEV tests
user=${PJD_USER:-tests}
exceptions=$repo/scripts/pjdfstest_exceptions.txt
start=$(date +%s)
export NO_COLOR=1 CLICOLOR=0 LC_ALL=C

for tool in mkfs.ext4 losetup fusermount3 runuser findmnt mount bc; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y e2fsprogs mount fuse3 util-linux bc)" >&2; exit 1; }
done
pjd=${PJDFSTEST:-$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")}
[ -x "$pjd" ] || { echo "no pjdfstest (cargo install pjdfstest; on Debian it needs libacl1-dev)" >&2; exit 1; }
if [ -z "${VELO:-}" ]; then
    (cd "$repo" && cargo build --release --quiet -p velo-cli)
    VELO=${CARGO_TARGET_DIR:-$repo/target}/release/velo
fi
[ -x "$VELO" ] || { echo "no velo binary at $VELO" >&2; exit 1; }

# pjdfstest's two dummy users, each with its own primary group.
nobody_group=$(id -gn nobody)
if ! id "$user" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$user"
fi
user_group=$(id -gn "$user")

fuse_mounts=()   # mount points of velo mounts: "user:store:mountpoint"
dev_fuse_mode=""
cleanup() {
    set +e
    local m
    for m in "${fuse_mounts[@]}"; do
        IFS=: read -r who store point <<<"$m"
        if mountpoint -q "$point"; then
            if [ "$who" = root ]; then "$VELO" --store "$store" umount "$point" >/dev/null 2>&1
            else runuser -u "$who" -- "$mnt/bin/velo" --store "$store" umount "$point" >/dev/null 2>&1; fi
            mountpoint -q "$point" && { umount "$point" 2>/dev/null || umount -l "$point"; }
        fi
    done
    release_loop
    rm -f "$img"
    mountpoint -q "$sec" && umount "$sec"
    [ -z "$dev_fuse_mode" ] || chmod "$dev_fuse_mode" /dev/fuse
    true
}
# Unmounts what a previous (interrupted) run left: FUSE mounts under the ext4, the ext4, its
# loop devices.
release_loop() {
    local m dev
    if mountpoint -q "$mnt"; then
        for m in $(findmnt -rn -o TARGET -R "$mnt" | tail -n +2 | sort -r); do
            umount "$m" 2>/dev/null || umount -l "$m"
        done
        umount "$mnt" 2>/dev/null || umount -l "$mnt"
    fi
    if [ -e "$img" ]; then
        for dev in $(losetup -j "$img" -O NAME -n); do losetup -d "$dev"; done
        for _ in $(seq 50); do # the kernel lets go of a device asynchronously
            [ -n "$(losetup -j "$img")" ] || break
            sleep 0.1
        done
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$work" "$mnt" "$sec" "$out"
release_loop
mountpoint -q "$sec" && umount "$sec"
rm -f "$img" "$out"/*.log "$out"/*.results "$out"/comparison.txt
truncate -s 2G "$img"
mkfs.ext4 -q -F "$img"
loopdev=$(losetup --find --show "$img")
mount "$loopdev" "$mnt"
mount -t tmpfs -o size=16m,mode=1777 pjd-secondary "$sec"
chmod 755 "$mnt"

# Tools where the unprivileged user can run them (root's home is private).
mkdir -p "$mnt/bin" "$mnt/wrap"
cp "$pjd" "$VELO" "$mnt/bin/"
printf '#!/bin/sh\nexec %s -i "$@"\n' "$(command -v mount)" >"$mnt/wrap/mount"
chmod -R a+rX "$mnt/bin" "$mnt/wrap"
chmod 755 "$mnt/wrap/mount"
for erofs in false true; do
    cat >"$mnt/bin/conf-$erofs.toml" <<EOF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01
allow_remount = $erofs

[dummy_auth]
entries = [["nobody", "$nobody_group"], ["$user", "$user_group"]]
EOF
done
chmod a+r "$mnt"/bin/*.toml

# A small tree to serve: files at the top and a directory for the treedir run.
mkdir -p "$mnt/src/sub/dir"
echo seed >"$mnt/src/seed"
echo seed >"$mnt/src/sub/dir/seed"

pjdfstest_version=$("$pjd" --version)
echo "== $pjdfstest_version, velo $VELO, repo at $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'), $(uname -r), loop ext4 $mnt ($loopdev)"

# run NAME AS_USER DIR [TIMES]: the full suite TIMES times (default 1), then (as root) the EROFS
# tests on their own. NAME.results: a test failing in any of them fails.
run() {
    local name=$1 as=$2 dir=$3 times=${4:-1} t0 rc i logs=()
    t0=$(date +%s.%N)
    local cmd=("$mnt/bin/pjdfstest" -c "$mnt/bin/conf-false.toml" -p "$dir" -s "$sec" "${patterns[@]}")
    for i in $(seq 1 "$times"); do
        local log=$out/$name.log
        [ "$times" = 1 ] || log=$out/$name.$i.log
        if [ "$as" = root ]; then "${cmd[@]}" >"$log" 2>&1 && rc=0 || rc=$?
        else runuser -u "$as" -- env NO_COLOR=1 "${cmd[@]}" >"$log" 2>&1 && rc=0 || rc=$?; fi
        if ! grep -q '^Summary:' "$log"; then
            echo "!! $name: pjdfstest did not finish (exit $rc); see $log" >&2
            incomplete=1
        fi
        logs+=("$log")
    done
    if [ "$as" = root ] && { [ ${#patterns[@]} = 0 ] || printf '%s\n' "${patterns[@]}" | grep -q erofs; }; then
        PATH=$mnt/wrap:$PATH "$mnt/bin/pjdfstest" -c "$mnt/bin/conf-true.toml" -p "$dir" -s "$sec" erofs \
            >"$out/$name.erofs.log" 2>&1 || true
    fi
    for log in "${logs[@]}"; do results "$log" "$out/$name.erofs.log"; done |
        awk '{n[$1]++; if (!($1 in r) || r[$1] == "ok" || $2 == "FAILED") r[$1] = $2; if ($2 == "FAILED") f[$1]++}
             END {for (t in r) print t, r[t], (t in f && n[t] > 1) ? f[t] "/" n[t] : ""}' |
        sed 's/ $//' | sort >"$out/$name.results"
    printf '== %-18s %s  (%s run%s, %.1f s)\n' "$name" "$(summary "$out/$name.results")" "$times" \
        "$([ "$times" = 1 ] || echo s)" "$(echo "$(date +%s.%N) - $t0" | bc)"
}
# "test status" lines from pjdfstest logs; a later log's result replaces an earlier one's.
results() {
    local f
    for f in "$@"; do if [ -f "$f" ]; then cat "$f"; fi; done |
        sed -nE 's/^([A-Za-z0-9_:]+) +(ok|FAILED|skipped|PASSED UNEXPECTEDLY|failed as expected)$/\1 \2/p' |
        sed 's/PASSED UNEXPECTEDLY/FAILED/; s/failed as expected/ok/' |
        awk '{r[$1]=$2} END {for (t in r) print t, r[t]}' | sort
}
summary() {
    awk '{n[$2]++} END {printf "%d passed, %d failed, %d skipped, %d total", n["ok"], n["FAILED"], n["skipped"], NR}' "$1"
}
mount_velo() { # mount_velo USER STORE MOUNTPOINT EXTRA_ARGS...
    local who=$1 store=$2 point=$3
    shift 3
    mkdir -p "$point"
    if [ "$who" = root ]; then
        "$VELO" --store "$store" ingest "$mnt/src" --name pjd >>"$out/velo.log" 2>&1
        fuse_mounts+=("root:$store:$point")
        "$VELO" --store "$store" mount pjd "$point" "$@" >>"$out/velo.log" 2>&1 || { cat "$out/velo.log" >&2; exit 1; }
    else
        chown "$who:" "$point"
        runuser -u "$who" -- "$mnt/bin/velo" --store "$store" ingest "$mnt/src" --name pjd >>"$out/velo.log" 2>&1
        fuse_mounts+=("$who:$store:$point")
        runuser -u "$who" -- "$mnt/bin/velo" --store "$store" mount pjd "$point" "$@" >>"$out/velo.log" 2>&1 ||
            { cat "$out/velo.log" >&2; exit 1; }
    fi
}
alive() { # alive USER MOUNTPOINT: the server still serves (the suite did not kill it)
    if ! runuser -u "$1" -- sh -c 'stat -f -c %T "$1" | grep -q fuse && ls "$1"' sh "$2" >/dev/null 2>&1; then
        echo "!! the velo server of $2 is gone" >&2
        incomplete=1
    fi
}

incomplete=0

# --- as root ---------------------------------------------------------------------------
mkdir -p "$mnt/ext4-root"
run ext4-root root "$mnt/ext4-root"
mount_velo root "$mnt/root-store" "$mnt/velo-root" --allow-other
run velo-root root "$mnt/velo-root" "$repeat"
run velo-root-treedir root "$mnt/velo-root/sub/dir" "$repeat"
alive root "$mnt/velo-root"
if [ "$passthrough" = 1 ]; then
    # a short path: pjdfstest binds sockets below it (sun_path holds 108 bytes)
    mount_velo root "$mnt/pt-store" "$mnt/pt" --allow-other --passthrough
    run velo-root-passthrough root "$mnt/pt" "$repeat"
    alive root "$mnt/pt"
fi

# --- as an unprivileged user -------------------------------------------------------------
if [ "$unpriv" = 1 ]; then
    if ! runuser -u "$user" -- test -r /dev/fuse -a -w /dev/fuse; then
        dev_fuse_mode=$(stat -c %a /dev/fuse)
        echo "== /dev/fuse is $dev_fuse_mode: 0666 for the unprivileged run (Debian's default), restored at exit"
        chmod 0666 /dev/fuse
    fi
    mkdir -p "$mnt/user"
    chown "$user:" "$mnt/user"
    runuser -u "$user" -- mkdir -p "$mnt/user/ext4"
    run ext4-user "$user" "$mnt/user/ext4"
    mount_velo "$user" "$mnt/user/store" "$mnt/user/velo"
    run velo-user "$user" "$mnt/user/velo" "$repeat"
    alive "$user" "$mnt/user/velo"
fi

# --- --verify-char: the ::char tests with 1/3 devices instead of 0/0 -------------------------
if [ "$verify_char" = 1 ]; then
    version=${pjdfstest_version##* }
    srcs=("$HOME"/.cargo/registry/src/*/pjdfstest-"$version")
    [ -d "${srcs[0]}" ] || { echo "no source of pjdfstest $version under ~/.cargo/registry/src" >&2; exit 1; }
    char13=$work/pjdfstest-$version-char13
    if [ ! -x "$char13/target/release/pjdfstest" ]; then # built once, then kept in PJD_WORK
        rm -rf "$char13"
        cp -r "${srcs[0]}" "$char13"
        sed -i 's|FileType::Char => mknod(&path, SFlag::S_IFCHR, mode, 0),|FileType::Char => mknod(\&path, SFlag::S_IFCHR, mode, nix::libc::makedev(1, 3)),|' \
            "$char13/src/context.rs"
        grep -q 'makedev(1, 3)' "$char13/src/context.rs" || { echo "could not patch pjdfstest's character devices" >&2; exit 1; }
        (cd "$char13" && CARGO_TARGET_DIR=$char13/target cargo build --release --locked --quiet)
    fi
    cp "$char13/target/release/pjdfstest" "$mnt/bin/pjdfstest-char13"
    for r in ext4-root velo-root; do
        d=$mnt/$r
        "$mnt/bin/pjdfstest-char13" -c "$mnt/bin/conf-false.toml" -p "$d" -s "$sec" ::char >"$out/$r-char13.log" 2>&1 || true
        results "$out/$r-char13.log" >"$out/$r-char13.results"
        printf '== %-18s %s\n' "$r-char13" "$(summary "$out/$r-char13.results")"
    done
fi

# --- comparison ----------------------------------------------------------------------------
declare -A excepted=()
if [ -f "$exceptions" ]; then
    while read -r name reason; do
        case $name in ''|'#'*) continue ;; esac
        [ -n "$reason" ] || { echo "$exceptions: $name has no reason" >&2; exit 1; }
        excepted[$name]=$reason
    done <"$exceptions"
fi
pairs=("ext4-root velo-root" "ext4-root velo-root-treedir")
[ "$passthrough" = 1 ] && pairs+=("ext4-root velo-root-passthrough")
[ "$unpriv" = 1 ] && pairs+=("ext4-user velo-user")
[ "$verify_char" = 1 ] && pairs+=("ext4-root-char13 velo-root-char13")
regressions=0
used=()
{
    for pair in "${pairs[@]}"; do
        read -r base velo <<<"$pair"
        echo "--- passing on $base, not on $velo"
        while read -r name b v note; do
            [ "$b" = ok ] && [ "$v" != ok ] || continue
            [ -z "$note" ] || v="$v $note"
            # the char13 check is what makes the 0/0 exceptions honest: no exception there
            if [ -n "${excepted[$name]:-}" ] && [ "$velo" != velo-root-char13 ]; then
                echo "  excepted  $name ($v): ${excepted[$name]}"
                used+=("$name")
            else
                echo "  REGRESSION $name ($v)"
                regressions=$((regressions + 1))
            fi
        done < <(join -a1 -e missing -o 0,1.2,2.2,2.3 "$out/$base.results" "$out/$velo.results" | sed 's/ missing$//')
        others=$(join -o 0,1.2,2.2 "$out/$base.results" "$out/$velo.results" | awk '$2 != "ok" && $3 == "ok" {print "  " $1 " (" $2 " on base)"}')
        [ -z "$others" ] || printf 'passing on %s only:\n%s\n' "$velo" "$others"
    done
    if [ ${#patterns[@]} = 0 ]; then # with a filter, most exceptions have nothing to apply to
        for name in "${!excepted[@]}"; do
            printf '%s\n' "${used[@]}" | grep -qxF "$name" || echo "note: exception $name did not apply in this run (stale?)"
        done | sort
    fi
    echo "--- $regressions regression(s); ${#used[@]} excepted (listed in $out/comparison.txt); runtime $(($(date +%s) - start)) s"
} >"$out/comparison.txt"
grep -v '^  excepted ' "$out/comparison.txt"
[ "$incomplete" = 0 ] || { echo "incomplete run (see above)" >&2; exit 1; }
[ "$regressions" = 0 ]
