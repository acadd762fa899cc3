#!/usr/bin/env bash
# Benchmark of `velo mount` (issue 11), each against the same work done natively on the
# same fresh loop ext4, alternated (A B A B ...), medians and ratios. Parts (PARTS, default
# all but make):
#   ls     mount to the first `ls` (the tree is not walked up front);
#   warm   `find TREE | wc -l`, `find -type f | xargs stat`, `cat` of every .c file, warm;
#   cold   `find` and `find | xargs stat` after `echo 3 > drop_caches` before each run;
#   untar  untar of the kernel source onto the mount (into its upper), then `rm -rf` of it;
#   read   sequential read of a 1 GiB file (cold and warm; also with --passthrough);
#   write  sequential write of 1 GiB (fsync'ed; also with --passthrough);
#   git    `git status` in the kernel tree made a git repository, warm and cold;
#   make   (or MAKE=1) `make -j2 fs/ext4/` of the kernel on the mount (after defconfig,
#          prepare).
# Usage: sudo bash scripts/bench_mount.sh   RUNS=7 (per contender, reads)  WRUNS=3 (writes)
#        MRUNS=2 (makes per contender)
#        PARTS="warm untar"  SMALL=1 (fs/ only, no 1 GiB files, no git: CI)  MAKE=1
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
parts=${PARTS:-ls warm cold untar read write git}
if [ "${MAKE:-0}" = 1 ]; then parts="$parts make"; fi
want() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# shellcheck source=scripts/bench_kernel_tree.sh
source scripts/bench_kernel_tree.sh

# Mount to first ls: the view exists already (built once per root, as for the shim).
"$velo" mount kernel "$fusemnt" >/dev/null 2>&1; "$velo" umount "$fusemnt"
if want ls; then
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
fi

"$velo" mount kernel "$fusemnt" >/dev/null 2>&1
# shellcheck disable=SC2086 # the times are words on purpose
report() { # name, native times, mount times (space-separated)
    local ma mb
    ma=$(printf '%s\n' $2 | median)
    mb=$(printf '%s\n' $3 | median)
    printf '%-34s native %8.3f s   mount %8.3f s   ratio %.2f\n' "$1" "$ma" "$mb" "$(echo "$mb / $ma" | bc -l)"
}
bench() { # name, command with TREE standing for the tree's path; COLD=1: caches dropped first
    local name=$1 cmd=$2 ta=() tb=() a b
    a=${cmd//TREE/$native}; b=${cmd//TREE/$fusemnt}
    bash -c "$a" >/dev/null 2>&1; bash -c "$b" >/dev/null 2>&1
    for _ in $(seq "$runs"); do
        if [ "${COLD:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
        ta+=("$(time_of bash -c "$a")")
        if [ "${COLD:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
        tb+=("$(time_of bash -c "$b")")
    done
    report "$name" "${ta[*]}" "${tb[*]}"
}
if want warm; then
    bench "find | wc -l (warm)" "find TREE | wc -l"
    bench "find -type f | xargs stat (warm)" "find TREE -type f -print0 | xargs -0 stat --format=%s"
    bench "cat every .c file (warm)" "find TREE -name '*.c' -print0 | xargs -0 cat"
fi
if want cold; then
    COLD=1 bench "find | wc -l (cold)" "find TREE | wc -l"
    COLD=1 bench "find -type f | xargs stat (cold)" "find TREE -type f -print0 | xargs -0 stat --format=%s"
fi
"$velo" umount "$fusemnt"

wruns=${WRUNS:-3}
# Untar and rm -rf: the archive decompressed once (so xz does not dominate), the same
# archive untarred natively and onto a mount whose upper is on the same ext4.
if want untar; then
tarball=$mnt/kernel.tar
( cd "$(dirname "$native")" && tar -cf "$tarball" "$(basename "$native")" )
mkdir -p "$mnt/empty"; "$velo" ingest "$mnt/empty" --name empty >/dev/null 2>&1
ut_a=(); ut_b=(); rm_a=(); rm_b=()
for i in $(seq "$wruns"); do
    mkdir -p "$mnt/untar-native"
    ut_a+=("$(time_of tar -xf "$tarball" -C "$mnt/untar-native")")
    "$velo" mount empty "$fusemnt" --upper "$mnt/upper-$i" >/dev/null 2>&1
    ut_b+=("$(time_of tar -xf "$tarball" -C "$fusemnt")")
    sync
    rm_a+=("$(time_of rm -rf "$mnt/untar-native")")
    rm_b+=("$(time_of bash -c "rm -rf $fusemnt/*")")
    "$velo" umount "$fusemnt"
    rm -rf "$mnt/upper-$i"
done
report "untar kernel source" "${ut_a[*]}" "${ut_b[*]}"
report "rm -rf of it" "${rm_a[*]}" "${rm_b[*]}"
rm -f "$tarball"
fi

# Sequential read and write of 1 GiB.
if [ "${SMALL:-0}" != 1 ] && { want read || want write; }; then
    mkdir -p "$mnt/big"
    head -c 1G /dev/urandom > "$mnt/big/file"
    "$velo" ingest "$mnt/big" --name big >/dev/null 2>&1
    seq_read() { # label, extra mount flags
        local label=$1; shift
        local ca=() cb=() wa=() wb=()
        "$velo" mount big "$fusemnt" "$@" >/dev/null 2>&1
        for _ in $(seq "$wruns"); do
            sync; echo 3 > /proc/sys/vm/drop_caches
            ca+=("$(time_of cat "$mnt/big/file")")
            sync; echo 3 > /proc/sys/vm/drop_caches
            cb+=("$(time_of cat "$fusemnt/file")")
            cat "$mnt/big/file" "$fusemnt/file" > /dev/null
            wa+=("$(time_of cat "$mnt/big/file")")
            wb+=("$(time_of cat "$fusemnt/file")")
        done
        "$velo" umount "$fusemnt"
        report "read 1 GiB cold$label" "${ca[*]}" "${cb[*]}"
        report "read 1 GiB warm$label" "${wa[*]}" "${wb[*]}"
    }
    seq_write() { # label, extra mount flags
        local label=$1; shift
        local wa=() wb=()
        for i in $(seq "$wruns"); do
            cat "$mnt/big/file" > /dev/null
            wa+=("$(time_of dd if="$mnt/big/file" of="$mnt/big/copy" bs=1M conv=fsync)")
            rm -f "$mnt/big/copy"
            "$velo" mount empty "$fusemnt" --upper "$mnt/wupper-$i" "$@" >/dev/null 2>&1
            wb+=("$(time_of dd if="$mnt/big/file" of="$fusemnt/copy" bs=1M conv=fsync)")
            "$velo" umount "$fusemnt"
            rm -rf "$mnt/wupper-$i"
        done
        report "write 1 GiB (fsync)$label" "${wa[*]}" "${wb[*]}"
    }
    if want read; then
        seq_read ""
        seq_read " (--passthrough)" --passthrough
    fi
    if want write; then
        mkdir -p "$mnt/empty"; "$velo" ingest "$mnt/empty" --name empty >/dev/null 2>&1
        seq_write ""
        seq_write " (--passthrough)" --passthrough
    fi
    rm -rf "$mnt/big"
fi

# git status in the kernel tree made a repository (one commit of everything), natively and
# on a mount of it; the first status on each side refreshes the index (the mount shows
# other inode numbers than the index recorded), so both are run before timing.
if want git && [ "${SMALL:-0}" != 1 ]; then
    dpkg -s git >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git >/dev/null
    # -f: Debian's kernel source has a .gitignore of `/*` (its packaging's).
    (cd "$native" && git init -q && git add -f -A && git -c gc.auto=0 -c user.name=bench -c user.email=bench@localhost commit -qm kernel)
    "$velo" ingest "$native" --name kernel-git >/dev/null 2>&1
    "$velo" mount kernel-git "$fusemnt" --upper "$mnt/gupper" >/dev/null 2>&1
    (cd "$fusemnt" && git status --porcelain >/dev/null)
    bench "git status (warm)" "cd TREE && git status --porcelain"
    COLD=1 bench "git status (cold)" "cd TREE && git status --porcelain"
    "$velo" umount "$fusemnt"
fi

# make -j2 fs/ext4/ of the kernel, on the mount (its upper takes the objects) and
# natively, once each after one warm-up (prepare) in each place.
if want make && [ "${SMALL:-0}" != 1 ]; then
    for p in gcc make flex bison bc libelf-dev libssl-dev; do dpkg -s "$p" >/dev/null 2>&1 || need_make=1; done
    if [ -n "${need_make:-}" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc make flex bison bc libelf-dev libssl-dev >/dev/null; fi
    (cd "$native" && make -s defconfig >/dev/null && make -s -j2 prepare >/dev/null 2>&1)
    "$velo" ingest "$native" --name kernel-prepared >/dev/null 2>&1
    "$velo" mount kernel-prepared "$fusemnt" --upper "$mnt/mupper" >/dev/null 2>&1
    # A tree made a git repository by the git part: every make runs scripts/setlocalversion,
    # whose `git --no-optional-locks status` never refreshes the index. The index holds the
    # stat data (inode, device, ctime) of the native files, so on the mount git would hash
    # every file of the tree again in every make. A user's first `git status` on the mount
    # refreshes it: done here too, on both sides.
    if [ -d "$native/.git" ]; then
        git -C "$native" status --porcelain >/dev/null 2>&1 || true
        git -C "$fusemnt" status --porcelain >/dev/null 2>&1 || true
    fi
    ma=(); mb=()
    for _ in 1 2; do
        (cd "$native" && make -s -j2 fs/ext4/ >/dev/null 2>&1; find fs/ext4 -name '*.o' -delete)
        (cd "$fusemnt" && make -s -j2 fs/ext4/ >/dev/null 2>&1; find fs/ext4 -name '*.o' -delete)
    done
    for _ in $(seq "${MRUNS:-2}"); do
        ma+=("$(time_of bash -c "cd $native && make -s -j2 fs/ext4/")")
        (cd "$native" && find fs/ext4 -name '*.o' -delete)
        mb+=("$(time_of bash -c "cd $fusemnt && make -s -j2 fs/ext4/")")
        (cd "$fusemnt" && find fs/ext4 -name '*.o' -delete)
    done
    "$velo" umount "$fusemnt"
    report "make -j2 fs/ext4/" "${ma[*]}" "${mb[*]}"
fi
echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
