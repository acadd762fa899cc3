#!/usr/bin/env bash
# Benchmarks of issue 9 (exact metadata in farms), each against a native baseline in the
# same run (medians of alternated runs, ratios):
#  python   `python3 -c 'import numpy, pandas'` warm: chroot into a copy of a Debian bookworm
#           root + a pip layer (numpy, pandas) vs `velo run --isolate --base debian-py
#           --manifest np` (the two ingested); the same for /bin/true (start-up alone);
#           checks that the sandbox run finds every .pyc valid and writes none;
#  checkout velo checkout --mode hardlink of the kernel tree vs cp -al (one fresh loop ext4
#           for store, source and destinations); variants made; mtimes/modes of sample files;
#  venvs    two venvs of the same packages installed a minute apart (a real `sleep 60`),
#           both ingested, checked out (hard links) and run in the sandbox: the bytes the
#           variants cost, on a loop ext4 and a loop btrfs.
# Usage: sudo bash scripts/bench_exact.sh
#   RUNS=5 ROUNDS=1       counts (sandbox runs per contender, checkout rounds); the short
#                         default is for CI, a full run: RUNS=21 ROUNDS=5
#   PARTS="python checkout venvs"   which parts to run
#   BENCH_CACHE=/var/cache/velo-bench  the debootstrap root, the pip layer and the venvs
#                         (made on first use: deb.debian.org and PyPI must be reachable)
#   OLD_VELO=BINARY       python part: also time an older velo (e.g. one built at ec67d2e^,
#                         before issue 9) on a store of its own on the same file system
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
rounds=${ROUNDS:-1}
parts=${PARTS:-python checkout venvs}
cache=${BENCH_CACHE:-/var/cache/velo-bench}
has() { [[ " $parts " == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || { echo "needs root (loop mounts, chroot)" >&2; exit 1; }
need=()
pkgs=(e2fsprogs perl bc)
if has python || has venvs; then pkgs+=(debootstrap); fi
if has checkout; then pkgs+=(linux-source-6.1); fi
if has venvs; then pkgs+=(btrfs-progs); fi
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --quiet -p velo-cli
built=${CARGO_TARGET_DIR:-$PWD/target}/release/velo
[ -x "$built" ] || { echo "no velo binary at $built" >&2; exit 1; }
# A copy, so that a rebuild by someone else during the run cannot swap the binary.
velo=/var/tmp/velo-bench-exact.bin
cp "$built" "$velo"

img=/var/tmp/velo-bench-exact.img
mnt=/mnt/velo-bench-exact
mounts=()
cleanup() {
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
    umount "$mnt" 2>/dev/null || true
    rm -f "$img" "$velo"
}
trap cleanup EXIT
umount "$mnt" 2>/dev/null || true
mkdir -p "$mnt" "$cache"
# fresh_fs SIZE ext4|btrfs: a new loop file system at $mnt, the store at $mnt/store.
fresh_fs() {
    umount "$mnt" 2>/dev/null || true
    rm -f "$img"
    truncate -s "$1" "$img"
    case $2 in
        ext4) mkfs.ext4 -q -F "$img" ;;
        btrfs) mkfs.btrfs -q -f "$img" >/dev/null ;;
    esac
    mount -o loop "$img" "$mnt"
    export VR_THE_SOURCE=$mnt/store
}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
echo "== velo $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' (crates modified)'), parts: $parts, RUNS=$runs ROUNDS=$rounds, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
t_start=$(date +%s)
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
jfield() { tr -d '\n ' | grep -o "\"$1\":[^,}]*" | head -1 | cut -d: -f2; }
# Times commands alternated (A B C A B C ...), each started by fork+exec from one perl
# process and timed to its exit; prints one median per command. A command is one string,
# its arguments separated by tabs.
alternate() {
    perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e '
        my $runs = shift; my @cmds = @ARGV; my @t = map { [] } @cmds;
        open(my $null, ">", "/dev/null") or die;
        for my $r (1 .. $runs) {
            for my $i (0 .. $#cmds) {
                my @argv = split /\t/, $cmds[$i];
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
T=$'\t'
# The same environment for the native runs as velo gives the command.
nenv_a=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root USER=root LOGNAME=root)
nenv=$(IFS=$T; echo "${nenv_a[*]}")
# Reads a tree (its files' bytes and metadata) into the page cache.
warm() { for d in "$@"; do tar -cf - -C "$d" . 2>/dev/null | cat >/dev/null; done; }

# The Debian bookworm root with python3 (cached).
base=$cache/debian-py-bookworm
make_base() {
    [ -d "$base" ] && return
    rm -rf "$base.tmp"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv bookworm "$base.tmp" http://deb.debian.org/debian >/dev/null
    mv "$base.tmp" "$base"
}
# chroot_work DIR CMD...: runs CMD in DIR with /proc mounted, the host's resolver and the
# host's CA bundle for pip (an intercepting proxy's CA is in the host's bundle, not the root's).
chroot_work() {
    local dir=$1; shift
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/tmp/host-ca.crt"
    mount -t proc proc "$dir/proc"; mounts+=("$dir/proc")
    local rc=0
    "${nenv_a[@]}" PIP_CERT=/tmp/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 chroot "$dir" "$@" || rc=$?
    umount "$dir/proc"
    return $rc
}

if has python; then
    make_base
    # The layer: what `pip install numpy pandas` adds to a copy of the root (all of it in
    # /usr/local), as a tree of the root's paths: np-layer/usr/local/lib/python3.11/dist-packages/...
    layer=$cache/np-layer
    if [ ! -d "$layer" ]; then
        work=$cache/np-work
        rm -rf "$work" "$layer.tmp"
        cp -a "$base" "$work"
        chroot_work "$work" pip install -q --no-cache-dir --break-system-packages numpy pandas
        mkdir -p "$layer.tmp/usr"
        mv "$work/usr/local" "$layer.tmp/usr/local"
        rm -rf "$work"
        mv "$layer.tmp" "$layer"
    fi
    fresh_fs 4G ext4
    cp -a "$base" "$mnt/debian-py"
    cp -a "$layer" "$mnt/np"
    native=$mnt/native
    cp -a "$base" "$native"
    cp -a "$layer/." "$native/"
    versions=$("${nenv_a[@]}" chroot "$native" python3 -c 'import numpy, pandas; print("numpy", numpy.__version__, "pandas", pandas.__version__)')
    echo "== python: $versions; layer $(find "$mnt/np" -type f | wc -l) files ($(find "$mnt/np" -name '*.pyc' | wc -l) .pyc), $(du -sh "$mnt/np" | cut -f1); base $(find "$mnt/debian-py" -type f | wc -l) files, $(du -sh "$mnt/debian-py" | cut -f1)"
    $velo ingest "$mnt/debian-py" --name debian-py 2>&1 | tail -1
    $velo ingest "$mnt/np" --name np 2>&1 | tail -1
    imp="import numpy, pandas"
    vrun=("$velo" run --isolate --base debian-py --manifest np)
    first=$("${vrun[@]}" --json -- python3 -c "$imp")
    echo "== first sandbox run (builds the farms): $(echo "$first" | tr -d '\n ' | sed 's/.*"farms_built":\(\[[^]]*\]\).*/farms built: \1/')"
    status=$($velo --json status)
    echo "== store after it: variants $(echo "$status" | jfield variants), variant_bytes $(echo "$status" | jfield variant_bytes) (blob_bytes $(echo "$status" | jfield blob_bytes)); files whose bytes another file of the same tree also holds: layer $(cd "$mnt/np" && find . -type f -print0 | xargs -0 sha256sum | awk '{print $1}' | sort | uniq -d -c | awk '{n += $1 - 1} END {print n + 0}'), base $(cd "$mnt/debian-py" && find . -type f -print0 | xargs -0 sha256sum | awk '{print $1}' | sort | uniq -d -c | awk '{n += $1 - 1} END {print n + 0}')"

    # Does the sandbox find every .pyc valid? python3 -v says, per module, where its code
    # came from ("code object from '<pyc>'", or from the source after "bytecode is stale"),
    # and "created '<pyc>'" for each .pyc it writes (to the upper, in the sandbox).
    pyv() { grep -c "$1" || true; }
    vlog=$("${vrun[@]}" -- python3 -v -c "$imp" 2>&1 >/dev/null)
    nlog=$("${nenv_a[@]}" chroot "$native" python3 -v -c "$imp" 2>&1 >/dev/null)
    printf '== python3 -v: %-8s %5s modules from a .pyc, %s stale, %s compiled from source, %s .pyc written\n' \
        sandbox "$(echo "$vlog" | pyv "^# code object from '")" "$(echo "$vlog" | pyv 'bytecode is stale')" "$(echo "$vlog" | pyv "^# code object from [^']")" "$(echo "$vlog" | pyv '^# created ')" \
        native "$(echo "$nlog" | pyv "^# code object from '")" "$(echo "$nlog" | pyv 'bytecode is stale')" "$(echo "$nlog" | pyv "^# code object from [^']")" "$(echo "$nlog" | pyv '^# created ')"
    # And what the run changed: commit it, and compare with the commit of a /bin/true run on
    # the same layers (the same tree unless the import wrote something).
    "${vrun[@]}" --name py-after -- python3 -c "$imp" >/dev/null
    "${vrun[@]}" --name py-noop -- /bin/true >/dev/null
    d=$($velo diff py-noop py-after 2>&1 || true)
    echo "== velo diff of a commit after /bin/true and one after the import: $(echo "$d" | grep -c . || true) changed paths"
    [ -z "$d" ] || echo "$d" | head -20 | sed 's/^/    /'
    $velo forget py-after >/dev/null; $velo forget py-noop >/dev/null

    old=()
    if [ -n "${OLD_VELO:-}" ]; then
        ostore=$mnt/store-old
        $OLD_VELO --store "$ostore" ingest "$mnt/debian-py" --name debian-py >/dev/null 2>&1
        $OLD_VELO --store "$ostore" ingest "$mnt/np" --name np >/dev/null 2>&1
        orun="$OLD_VELO${T}--store${T}$ostore${T}run${T}--isolate${T}--base${T}debian-py${T}--manifest${T}np${T}--${T}"
        IFS=$T read -r -a a <<<"${orun}python3${T}-v${T}-c${T}$imp"
        olog=$("${a[@]}" 2>&1 >/dev/null)
        printf '== python3 -v: %-8s %5s modules from a .pyc, %s stale, %s compiled from source, %s .pyc written\n' OLD_VELO \
            "$(echo "$olog" | pyv "^# code object from '")" "$(echo "$olog" | pyv 'bytecode is stale')" "$(echo "$olog" | pyv "^# code object from [^']")" "$(echo "$olog" | pyv '^# created ')"
        old=("${orun}python3${T}-c${T}$imp")
    fi
    warm "$native" "$mnt/store" ${OLD_VELO:+"$mnt/store-old"}
    # Warm-up of every contender, then the alternated runs.
    vpy="$velo${T}run${T}--isolate${T}--base${T}debian-py${T}--manifest${T}np${T}--${T}python3${T}-c${T}$imp"
    npy="$nenv${T}chroot${T}$native${T}python3${T}-c${T}$imp"
    vtrue="$velo${T}run${T}--isolate${T}--base${T}debian-py${T}--manifest${T}np${T}--${T}/bin/true"
    ntrue="$nenv${T}chroot${T}$native${T}/bin/true"
    alternate 1 "$npy" "$vpy" "$ntrue" "$vtrue" "${old[@]}" >/dev/null
    mapfile -t m < <(alternate "$runs" "$npy" "$vpy" "$ntrue" "$vtrue" "${old[@]}")
    [ ${#m[@]} = $((4 + ${#old[@]})) ] || { echo "the timing loop failed" >&2; exit 1; }
    printf '== python3 -c "%s", median of %s runs each (alternated), load average after: %s\n' "$imp" "$runs" "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%-56s %8.4f s\n' "chroot (native, a copy of base + layer)" "${m[0]}" \
        "velo run --isolate --base debian-py --manifest np" "${m[1]}" \
        "/bin/true: chroot" "${m[2]}" "/bin/true: velo run --isolate" "${m[3]}"
    [ ${#old[@]} = 0 ] || printf '%-56s %8.4f s   ratio to native: %.2f\n' "OLD_VELO run --isolate (import)" "${m[4]}" "$(echo "${m[4]} / ${m[0]}" | bc -l)"
    printf 'ratio velo / native (import):     %.2f   (target <= 1.1)\n' "$(echo "${m[1]} / ${m[0]}" | bc -l)"
    printf 'difference velo - native (import): %+.4f s; (/bin/true): %+.4f s\n' "$(echo "${m[1]} - ${m[0]}" | bc -l)" "$(echo "${m[3]} - ${m[2]}" | bc -l)"
    umount "$mnt"
fi

if has checkout; then
    fresh_fs 12G ext4
    src=$mnt/linux
    mkdir -p "$src"
    tar -xf /usr/src/linux-source-6.1.tar.xz -C "$src" --strip-components=1
    files=$(find "$src" -type f | wc -l)
    $velo ingest "$src" --name kernel 2>&1 | tail -1
    sync
    dest=$mnt/out-velo
    co=$($velo --json checkout --mode hardlink kernel "$dest")
    echo "== first checkout of the kernel tree ($files files): $(echo "$co" | jfield seconds) s, variants_made $(echo "$co" | jfield variants_made), inexact_modes $(echo "$co" | jfield inexact_modes)"
    # Sample files: every 9000th of the sorted list, plus the executables among the first.
    mapfile -t sample < <( (cd "$src" && find . -type f | sort | awk 'NR % 9000 == 1'; cd "$src" && find . -type f -perm -u+x | sort | head -2) )
    bad=0
    for f in "${sample[@]}"; do
        a=$(stat -c '%y %a' "$src/$f"); b=$(stat -c '%y %a' "$dest/$f")
        [ "${a% *}" = "${b% *}" ] || bad=$((bad + 1))
        printf '    %-52s source %s  checkout %s\n' "$f" "$a" "${b##* }"
    done
    echo "== ${#sample[@]} sample files: $bad with another mtime in the checkout than in the source"
    rm -rf "$dest"
    status=$($velo --json status)
    echo "== store: variants $(echo "$status" | jfield variants), variant_bytes $(echo "$status" | jfield variant_bytes)"

    declare -A times
    for ((r = 1; r <= rounds; r++)); do
        warm "$src" "$mnt/store"
        for who in velo cpal; do
            dest=$mnt/out-$who
            rm -rf "$dest"; sync
            t0=$(now)
            case $who in
                velo) $velo checkout --mode hardlink kernel "$dest" >/dev/null 2>&1 ;;
                cpal) cp -al "$src" "$dest" ;;
            esac
            t1=$(now)
            times[$who]+="$(echo "$t1 - $t0" | bc) "
            rm -rf "$dest"
        done
    done
    v=$(echo ${times[velo]} | tr ' ' '\n' | median)
    c=$(echo ${times[cpal]} | tr ' ' '\n' | median)
    printf '== checkout of %s files, median of %s rounds (alternated), load average after: %s\n' "$files" "$rounds" "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf '    %-32s %s\n' "velo checkout --mode hardlink" "$(printf '%.3f ' ${times[velo]})" "cp -al" "$(printf '%.3f ' ${times[cpal]})"
    printf '%-34s %8.3f s\n' "velo checkout --mode hardlink" "$v" "cp -al" "$c"
    printf 'ratio velo / cp -al:  %.2f   (target <= 1.0)\n' "$(echo "$v / $c" | bc -l)"
    umount "$mnt"
fi

if has venvs; then
    make_base
    pkgs_venv="requests six numpy"
    # Two venvs at /opt/venv, made one after the other in a copy of the root, a minute
    # apart, from the same downloaded wheels: the same bytes, other mtimes.
    if [ ! -d "$cache/venv-b" ]; then
        work=$cache/venv-work
        rm -rf "$work" "$cache/venv-a" "$cache/venv-b"
        cp -a "$base" "$work"
        chroot_work "$work" pip download -q --no-cache-dir -d /wheels $pkgs_venv
        for v in a b; do
            [ $v = a ] || sleep 60
            chroot_work "$work" python3 -m venv /opt/venv
            chroot_work "$work" /opt/venv/bin/pip install -q --no-cache-dir --no-index --find-links /wheels $pkgs_venv
            mkdir -p "$cache/venv-$v.tmp/opt"
            mv "$work/opt/venv" "$cache/venv-$v.tmp/opt/venv"
            mv "$cache/venv-$v.tmp" "$cache/venv-$v"
        done
        rm -rf "$work"
    fi
    echo "== venvs: $pkgs_venv (+ pip, setuptools), $(find "$cache/venv-a" -type f | wc -l) files, $(du -sh "$cache/venv-a" | cut -f1) each; made $(stat -c %y "$cache/venv-a/opt/venv/pyvenv.cfg" | cut -c12-19) and $(stat -c %y "$cache/venv-b/opt/venv/pyvenv.cfg" | cut -c12-19)"
    echo "   same bytes in both: $(cd "$cache" && diff -rq --no-dereference venv-a venv-b | wc -l) of the $(find "$cache/venv-a" -type f | wc -l) files differ in content ($(cd "$cache" && diff -rq --no-dereference venv-a venv-b | grep -vc '\.pyc ' || true) not a .pyc)"
    used() { sync; df -B1 --output=used "$mnt" | tail -1; }
    for fs in ext4 btrfs; do
        fresh_fs 3G $fs
        cp -a "$base" "$mnt/debian-py"; cp -a "$cache/venv-a" "$mnt/venv-a"; cp -a "$cache/venv-b" "$mnt/venv-b"
        $velo ingest "$mnt/debian-py" --name debian-py >/dev/null 2>&1
        u0=$(used)
        s0=$($velo --json status)
        $velo ingest "$mnt/venv-a" --name venv-a >/dev/null 2>&1
        $velo ingest "$mnt/venv-b" --name venv-b >/dev/null 2>&1
        u1=$(used)
        s1=$($velo --json status)
        du1=$(du -s -B1 "$mnt/store" | cut -f1)
        printf '== %s: after ingesting debian-py, venv-a, venv-b: blob_bytes %s (%s of them for the venvs), variants %s, variant_bytes %s; df used +%s B for the venvs\n' \
            $fs "$(echo "$s1" | jfield blob_bytes)" "$(( $(echo "$s1" | jfield blob_bytes) - $(echo "$s0" | jfield blob_bytes) ))" \
            "$(echo "$s1" | jfield variants)" "$(echo "$s1" | jfield variant_bytes)" "$((u1 - u0))"
        echo "   du -s of the store without variants: $du1 B"
        for v in a b; do
            co=$($velo --json checkout --mode hardlink venv-$v "$mnt/co-$v")
            st=$($velo --json status)
            echo "   checkout --mode hardlink of venv-$v: $(echo "$co" | jfield seconds | xargs printf '%.3f') s, variants_made $(echo "$co" | jfield variants_made), inexact_modes $(echo "$co" | jfield inexact_modes); store variants $(echo "$st" | jfield variants), variant_bytes $(echo "$st" | jfield variant_bytes)"
        done
        u2=$(used)
        s2=$($velo --json status)
        printf '   after both checkouts: variants %s, variant_bytes %s; df used +%s B\n' \
            "$(echo "$s2" | jfield variants)" "$(echo "$s2" | jfield variant_bytes)" "$((u2 - u1))"
        # venv-b's checkout is mostly variants: do they show venv-b's times?
        bad=0 n=0
        while read -r f; do
            n=$((n + 1))
            [ "$(stat -c %Y.%y "$mnt/venv-b/$f")" = "$(stat -c %Y.%y "$mnt/co-b/$f")" ] || bad=$((bad + 1))
        done < <(cd "$mnt/venv-b" && find . -type f ! -name '*.pyc' | sort | awk 'NR % 50 == 1')
        echo "   $n sample files of venv-b (not .pyc): $bad with another mtime in its checkout"
        for v in a b; do
            r=$($velo --json run --isolate --base debian-py --manifest venv-$v -- /opt/venv/bin/python -c 'import requests, six, numpy' | tr -d '\n ')
            echo "   run --isolate of venv-$v (default --farm-modes): farms_built $(echo "$r" | sed 's/.*"farms_built":\(\[[^]]*\]\).*/\1/')"
        done
        vlog=$($velo run --isolate --base debian-py --manifest venv-b -- /opt/venv/bin/python -v -c 'import requests, six, numpy' 2>&1 >/dev/null)
        echo "   python -v in the sandbox of venv-b: $(echo "$vlog" | grep -c "^# code object from '" || true) modules from a .pyc, $(echo "$vlog" | grep -c 'bytecode is stale' || true) stale"
        u3=$(used)
        s3=$($velo --json status)
        printf '   after both runs: variants %s, variant_bytes %s; df used +%s B\n' \
            "$(echo "$s3" | jfield variants)" "$(echo "$s3" | jfield variant_bytes)" "$((u3 - u2))"
        printf '   du -s of the store: %s B (apparent sizes: %s B)\n' "$(du -s -B1 "$mnt/store" | cut -f1)" "$(du -s -b "$mnt/store" | cut -f1)"
        [ $fs = ext4 ] || btrfs filesystem du -s --raw "$mnt/store" | sed 's/^/   /'
        if $velo fsck >/dev/null 2>&1; then echo "   velo fsck: sound"; else echo "   velo fsck: FAILED (exit $?)"; $velo fsck 2>&1 | head -20 | sed 's/^/    /'; fi
        umount "$mnt"
    done
fi
echo "== done in $(( $(date +%s) - t_start )) s, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
