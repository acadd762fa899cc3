#!/usr/bin/env bash
# Issue 13's figures: velo push / pull / mount --remote of the kernel tree (78,579 files)
# against `rclone copy` of the same directory, both to the same S3 server on loopback
# (moto's, as the tests use), same machine, same run; the contenders alternate.
#   sudo bash scripts/bench_remote.sh            # RUNS=3 rounds (default); SMALL=1: fs/ only
# Prints each round's seconds, the medians and the ratios (velo / rclone).
set -euo pipefail
cd "$(dirname "$0")/.."
img=/var/tmp/velo-bench-remote.img
mnt=/mnt/velo-bench-remote
packages="rclone python3"
crates="-p velo-cli"
moto_dir=${VELO_MOTO_DIR:-/var/cache/velo-tests/moto/pkgs}
if [ ! -d "$moto_dir/moto" ]; then
    mkdir -p "$moto_dir"
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages --target "$moto_dir" 'moto[server]'
fi
moto_pid=
extra_cleanup() {
    [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null || true
    umount "$mnt/lazy" 2>/dev/null || true
}
# shellcheck source=scripts/bench_kernel_tree.sh
source scripts/bench_kernel_tree.sh

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PYTHONPATH=$moto_dir python3 -c 'import sys; from moto.server import main; sys.exit(main())' -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto_pid=$!
endpoint=http://127.0.0.1:$port
for _ in $(seq 100); do curl -s -o /dev/null "$endpoint" && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
# A CA bundle for the machine's proxy makes rclone's S3 client refuse its own transport;
# the server here is plain http on loopback.
unset AWS_CA_BUNDLE
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other RCLONE_CONFIG_BENCH_ENDPOINT=$endpoint \
    RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=bench RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=bench-secret
echo "== server: moto $(PYTHONPATH=$moto_dir python3 -c 'import moto; print(moto.__version__)') at $endpoint; rclone $(rclone version | head -1 | awk '{print $2}') (defaults: --transfers 4 --checkers 8)"
runs=${RUNS:-3}
push_v=(); push_r=(); repush=(); pull_v=(); pull_r=(); first_cat=()
for i in $(seq "$runs"); do
    rclone mkdir "bench:velo-bench-$i" && rclone mkdir "bench:rclone-bench-$i"
    "$velo" remote remove "b$i" >/dev/null 2>&1 || true
    "$velo" remote add "b$i" "s3://velo-bench-$i/velo" --endpoint "$endpoint" >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches
    push_v+=("$(time_of "$velo" push "b$i" kernel)")
    sync; echo 3 > /proc/sys/vm/drop_caches
    push_r+=("$(time_of rclone copy "$native" "bench:rclone-bench-$i/tree")")
    repush+=("$(time_of "$velo" push "b$i" kernel)")
    store2=$mnt/pulled-$i
    "$velo" --store "$store2" remote add b "s3://velo-bench-$i/velo" --endpoint "$endpoint" >/dev/null
    pull_v+=("$(time_of "$velo" --store "$store2" pull b kernel)")
    pull_r+=("$(time_of rclone copy "bench:rclone-bench-$i/tree" "$mnt/rclone-back-$i")")
    "$velo" --store "$store2" fsck --quick >/dev/null
    # Lazy: a third store mounts the tree and reads one file it has never fetched.
    store3=$mnt/lazy-store-$i
    mkdir -p "$mnt/lazy"
    "$velo" --store "$store3" remote add b "s3://velo-bench-$i/velo" --endpoint "$endpoint" >/dev/null
    "$velo" --store "$store3" mount kernel "$mnt/lazy" --remote b >/dev/null 2>&1
    first_cat+=("$(time_of cat "$mnt/lazy/Makefile")")
    "$velo" --store "$store3" umount "$mnt/lazy" >/dev/null
    rm -rf "$store2" "$store3" "$mnt/rclone-back-$i"
    echo "round $i: push velo ${push_v[-1]} s, rclone ${push_r[-1]} s; re-push ${repush[-1]} s; pull velo ${pull_v[-1]} s, rclone ${pull_r[-1]} s; mount --remote first cat ${first_cat[-1]} s"
done
m() { printf '%s\n' "$@" | median; }
pv=$(m "${push_v[@]}"); pr=$(m "${push_r[@]}"); lv=$(m "${pull_v[@]}"); lr=$(m "${pull_r[@]}")
echo "== medians of $runs: push velo $pv s, rclone $pr s: ratio $(echo "scale=3; $pv / $pr" | bc) (target <= 0.5)"
echo "==   re-push of the unchanged tree: $(m "${repush[@]}") s (target < 2 s)"
echo "==   pull velo $lv s, rclone copy back $lr s: ratio $(echo "scale=3; $lv / $lr" | bc) (target <= 0.5)"
echo "==   mount --remote, first cat of one file: $(m "${first_cat[@]}") s (target < 0.1 s)"
