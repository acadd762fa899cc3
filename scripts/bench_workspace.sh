#!/usr/bin/env bash
# The agent workspace's figures (issue 12), on the kernel tree (linux-source-6.1) in a
# fresh loop ext4, store and workspace on it. Root (loop mounts). RUNS (default 9) runs of
# each timed step, medians; `unshare -m true` and `velo branch exec -- true` alternated.
#
#   sudo bash scripts/bench_workspace.sh
#   SMALL=1 RUNS=3 ...   fs/ only, for a quick pass (the figures then say nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
img=/var/tmp/velo-bench-ws.img
mnt=/mnt/velo-bench-ws
packages=""
crates="-p velo-cli"
wsmnt=$mnt-view
extra_cleanup() {
    "$velo" umount "$wsmnt" >/dev/null 2>&1 || true
}
# shellcheck source=scripts/bench_kernel_tree.sh
source scripts/bench_kernel_tree.sh
runs=${RUNS:-9}
ms() { echo "$1 * 1000" | bc | awk '{printf "%.1f", $1}'; }

ws=$mnt/ws
mkdir -p "$wsmnt"
"$velo" workspace init "$ws" --from kernel --mount "$wsmnt" >/dev/null 2>&1
export VELO_WORKSPACE=$ws
files=$(cd "$native" && find . -type f -name '*.c' | sort | awk 'NR <= 10 { sub(/^\.\//, ""); print }')

# branch create: records only, whatever the tree's size (the server is told too).
create=()
for i in $(seq "$runs"); do create+=("$(time_of "$velo" branch create "c$i")"); done
create_ms=$(ms "$(printf '%s\n' "${create[@]}" | median)")

# A snapshot of a branch with 10 changed files, then a diff of two such snapshots.
snap=()
for i in $(seq "$runs"); do
    for f in $files; do echo "// edit $i" >> "$wsmnt/.velo/branches/c$i/$f"; done
    snap+=("$(time_of "$velo" snapshot create --branch "c$i")")
done
snap_ms=$(ms "$(printf '%s\n' "${snap[@]}" | median)")
diffs=()
for i in $(seq 2 "$runs"); do diffs+=("$(time_of "$velo" diff "$((i - 1))" "$i")"); done
diff_ms=$(ms "$(printf '%s\n' "${diffs[@]}" | median)")
changed=$("$velo" diff 1 2 --stat)

# branch exec -- true against unshare -m true, alternated.
un=(); ex=()
for i in $(seq "$runs"); do
    un+=("$(time_of unshare -m true)")
    ex+=("$(time_of "$velo" branch exec c1 -- true)")
done
un_ms=$(ms "$(printf '%s\n' "${un[@]}" | median)")
ex_ms=$(ms "$(printf '%s\n' "${ex[@]}" | median)")

# Disk use of 8 branches with 10 changed files each, against one tree's (the store).
for i in $(seq 9 16); do
    "$velo" branch create "d$i" >/dev/null 2>&1
    for f in $files; do echo "// edit $i" >> "$wsmnt/.velo/branches/d$i/$f"; done
done
sync
store_kb=$(du -sk "$VR_THE_SOURCE" | cut -f1)
uppers_kb=$(du -sk "$ws" | cut -f1)
tree_kb=$(du -sk "$native" | cut -f1)

# A workspace over the host tree itself (--lower: indexed, no file read), and its first
# snapshot (which ingests it; the store already holds every blob, so this is the stat pass
# and the check against the index).
lower_s=$(time_of "$velo" workspace init "$mnt/ws-lower" --lower "$native")
lsnap_s=$(time_of "$velo" snapshot -w "$mnt/ws-lower" create)

echo "branch create                 ${create_ms} ms (median of $runs)        target < 10 ms"
echo "snapshot, 10 files changed    ${snap_ms} ms (median of $runs)        target < 50 ms"
echo "diff of two snapshots         ${diff_ms} ms (median of $((runs - 1)); $changed)   target < 50 ms"
echo "branch exec -- true           ${ex_ms} ms   unshare -m true ${un_ms} ms   ratio $(echo "$ex_ms / $un_ms" | bc -l | awk '{printf "%.2f", $1}')   target <= 1.5"
echo "disk: tree (native copy) ${tree_kb} KiB; store ${store_kb} KiB; workspace with $((runs + 8)) branches of 10 changed files and $runs snapshots ${uppers_kb} KiB"
echo "      store + workspace over store alone: $(echo "($store_kb + $uppers_kb) / $store_kb" | bc -l | awk '{printf "%.4f", $1}')   target <= 1.01"
echo "workspace init --lower        $(ms "$lower_s") ms (one run; $(find "$native" | wc -l) entries indexed, no file read)"
echo "its first snapshot            $(ms "$lsnap_s") ms (one run; ingest of a tree whose blobs the store has, and the check)"
