#!/usr/bin/env bash
# Makes busybox.velo: a minimal base layer (a static busybox with its applets as symlinks,
# plus the usual top-level directories) from Debian's busybox-static, with its blobs, so
# `velo run --isolate --base busybox.velo ...` works on a machine with an empty store.
# A static /bin/busybox is used as it is; otherwise the package is downloaded (apt-get).
# Usage: scripts/setup_busybox.sh [OUT.velo]   (default: ./busybox.velo)
set -euo pipefail
out=${1:-busybox.velo}
here=$(cd "$(dirname "$0")/.." && pwd)
velo=${VELO:-${CARGO_TARGET_DIR:-$here/target}/release/velo}
if [ ! -x "$velo" ]; then
    (cd "$here" && cargo build --release --quiet)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A static busybox runs in a tree without libc; Debian's plain `busybox` is dynamic.
static_busybox() {
    local out
    [ -x /bin/busybox ] || return 1
    out=$(LC_ALL=C ldd /bin/busybox 2>&1 || true) # ldd fails on a static binary
    grep -qE 'not a dynamic executable|statically linked' <<<"$out"
}
if dpkg -s busybox-static >/dev/null 2>&1 || static_busybox; then
    # Use the host's static binary: no download.
    mkdir -p "$work/pkg/bin" && cp /bin/busybox "$work/pkg/bin/busybox"
else
    deb=$(ls /var/cache/apt/archives/busybox-static_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        (cd "$work" && { apt-get download busybox-static >/dev/null 2>&1 || { apt-get update -qq && apt-get download busybox-static; }; })
        deb=$(ls "$work"/busybox-static_*.deb)
    fi
    dpkg-deb -x "$deb" "$work/pkg"
fi
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,dev,sys,var,home}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
chmod 1777 "$root/tmp"
"$velo" ingest "$root" --name busybox --mtime zero >/dev/null
"$velo" export busybox -o "$out" --with-blobs
echo "wrote $out"
