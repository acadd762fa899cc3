#!/usr/bin/env bash
# The main job on the bundled sample: build velo, ingest samples/demo-project into a fresh
# store, inspect it, carry it to a second store through a .velo file, check both, and
# finally project it into a program: `velo run --isolate` over a busybox base layer, and a
# run whose changes are committed as a new tree. The run step needs a static busybox
# (Debian's busybox-static; installed here when run as root with apt) and user namespaces;
# without them it says why and is skipped. Nothing else needs the network.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
velo=${CARGO_TARGET_DIR:-target}/release/velo
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export VR_THE_SOURCE="$work/store"

echo "== velo ingest samples/demo-project"
root=$($velo ingest samples/demo-project --name demo -o "$work/demo.velo")
echo "root: $root"
echo "== velo ls -lR demo"
$velo ls demo -lR
echo "== velo cat demo bin/hello.sh"
$velo cat demo bin/hello.sh
echo "== velo show demo bin/main.c"
$velo show demo bin/main.c
echo "== velo checkout demo (a link farm: hard links into the store)"
$velo checkout demo "$work/farm"
diff -r --no-dereference samples/demo-project "$work/farm" && echo "checkout equals the source"
echo "== velo status"
$velo status
echo "== export with blobs, import into an empty store, compare"
$velo export demo -o "$work/demo-full.velo" --with-blobs
imported=$($velo --store "$work/second-store" import "$work/demo-full.velo" --name demo)
[ "$imported" = "$root" ] && echo "same root in the second store: $imported"
$velo --store "$work/second-store" cat demo src/main.c | cmp - samples/demo-project/src/main.c && echo "content identical"
echo "== velo fsck (both stores)"
$velo fsck
$velo --store "$work/second-store" fsck
echo "== velo gc (dry run)"
$velo gc

echo
echo "== velo run --isolate: the sample as the top layer of a rootless sandbox"
# A static busybox runs inside a tree without libc; Debian's plain `busybox` is dynamic.
static_busybox() {
    local out
    [ -x /bin/busybox ] || return 1
    out=$(LC_ALL=C ldd /bin/busybox 2>&1 || true) # ldd fails on a static binary
    grep -qE 'not a dynamic executable|statically linked' <<<"$out"
}
skip=""
if ! static_busybox; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "(installing Debian's busybox-static for the base layer: apt-get install busybox-static)"
        # --no-remove: never take another package away to make room for it.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove busybox-static >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-remove busybox-static >/dev/null 2>&1; } \
            || true
    fi
    static_busybox || skip="no static /bin/busybox for the base layer (install Debian's busybox-static: sudo apt-get install busybox-static)"
fi
if [ -z "$skip" ]; then
    checks=$($velo doctor 2>&1 || true)
    for need in "user namespaces" "overlayfs"; do
        if ! grep -q "^ok *$need" <<<"$checks"; then
            skip="the sandbox cannot start here; velo doctor says: $(grep -m1 "$need" <<<"$checks" | sed 's/  */ /g')"
            break
        fi
    done
fi
if [ -n "$skip" ]; then
    echo "skipped: $skip"
    exit 0
fi
echo "== scripts/setup_busybox.sh busybox.velo (a minimal base layer from the host's static busybox)"
VELO=$velo bash scripts/setup_busybox.sh "$work/busybox.velo" 2>/dev/null
echo "== velo run --isolate --base busybox.velo --manifest demo --name demo-env -- sh -c '…'"
echo "   (the layers merge: the sample's bin/hello.sh lands in busybox's /bin; --name keeps the tree)"
# shellcheck disable=SC2016 # expanded inside the sandbox
$velo run --isolate --base "$work/busybox.velo" --manifest demo --name demo-env -- \
    /bin/sh -c 'hello.sh; echo "I am uid $(id -u) on host $(hostname); / holds: $(ls / | tr "\n" " ")"'
echo "== a run that changes files; --name commits its changes as a new tree"
# shellcheck disable=SC2016 # expanded inside the sandbox
$velo run --isolate --manifest demo-env --name demo-changed -- /bin/sh -c '
    sed -i "s/a velo tree/a velo sandbox/" /src/main.c
    rm /src/main_copy.c
    mkdir -p /build && echo "built in the sandbox" > /build/log
    echo "changed 3 things inside"'
echo "== velo diff demo-env demo-changed"
$velo diff demo-env demo-changed
echo "== velo cat demo-changed src/main.c (the original demo tree and samples/ are unchanged)"
$velo cat demo-changed src/main.c
$velo cat demo src/main.c | cmp -s - samples/demo-project/src/main.c && echo "demo still holds the original src/main.c"
