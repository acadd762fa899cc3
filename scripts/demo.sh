#!/usr/bin/env bash
# The main job on the bundled sample: build velo, ingest samples/demo-project into a fresh
# store, inspect it, carry it to a second store through a .velo file, and check both.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
velo=target/release/velo
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
