#!/usr/bin/env bash
# Builds the root file system of the sandbox image as a tar archive, without any image registry:
# debootstrap (minbase) of Debian bookworm from the mirror apt already uses, with the packages of
# packages.txt (the one list, shared with the Dockerfile), a user `claude` with uid 1000, the
# Claude Code CLI's native binary in /usr/local/bin, and ~/.claude (with projects/) and
# ~/.claude-mem owned by that user. Import the result with
#   podman import --change 'USER claude' --change 'WORKDIR /home/claude' OUT.tar NAME:TAG
#
# Usage (as root): build-rootfs.sh OUT.tar CLAUDE_BINARY
#                  build-rootfs.sh --base OUT.tar   (a plain minbase tree: the local stand-in for
#                  debian:bookworm-slim when building the bot's own image without a registry)
# Environment:
#   DEBIAN_SUITE   suite to bootstrap (default bookworm)
#   DEBIAN_MIRROR  mirror URL (default: the first one apt's sources use for that suite)
#   ROOTFS_DIR     where to build the tree (default: a fresh directory beside OUT.tar); removed
#                  afterwards
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=${DEBIAN_SUITE:-bookworm}
sandbox_uid=1000

die() { printf 'build-rootfs.sh: %s\n' "$*" >&2; exit 1; }

# The packages of packages.txt, comma-separated: comments and blank lines dropped.
package_list() {
    sed -e 's/#.*//' "$here/packages.txt" | tr -s ' \t\n' '\n' | sed '/^$/d' | paste -sd, -
}

# The first mirror URL that apt's sources use for $suite, from one-line (*.list) or deb822
# (*.sources) files.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk -v s="$suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^[ \t]*#/ || !match($i, /^[A-Za-z-]+:/)) continue
                    key = tolower(substr($i, 1, RLENGTH - 1)); val = substr($i, RLENGTH + 1)
                    gsub(/^[ \t]+|[ \t]+$/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " s " ")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f"
    done
}

# Unmounts whatever debootstrap may have left mounted under $1, then removes the tree without
# crossing into another file system.
remove_tree() {
    local dir=$1 m
    [ -d "$dir" ] || return 0
    awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while IFS= read -r m; do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$dir"
}

main() {
    local base=no
    if [ "${1:-}" = --base ]; then
        base=yes
        shift
        [ $# -eq 1 ] || die "usage: build-rootfs.sh --base OUT.tar"
        set -- "$1" /bin/true
    fi
    [ $# -eq 2 ] || die "usage: build-rootfs.sh OUT.tar CLAUDE_BINARY | build-rootfs.sh --base OUT.tar"
    local out=$1 claude_bin=$2 mirror packages
    [ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot need it)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [ -x "$claude_bin" ] || die "not an executable Claude Code binary: $claude_bin"
    mirror=${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}
    [ -n "$mirror" ] || die "no apt source for '$suite' found; set DEBIAN_MIRROR"
    packages=$(package_list)
    # Global: the EXIT trap removes it after main has returned.
    rootfs=${ROOTFS_DIR:-$(dirname "$out")/rootfs.$$}

    remove_tree "$rootfs"
    trap 'remove_tree "$rootfs"' EXIT
    mkdir -p "$rootfs"

    if [ "$base" = yes ]; then
        echo "debootstrap --variant=minbase $suite $rootfs $mirror"
        debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
        tar --numeric-owner -C "$rootfs" -cf "$out.partial" .
        mv "$out.partial" "$out"
        return
    fi
    echo "debootstrap --variant=minbase --include=$packages $suite $rootfs $mirror"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"

    echo "adding user claude (uid $sandbox_uid), the Claude Code CLI and its directories"
    chroot "$rootfs" useradd -m -u "$sandbox_uid" -U -s /bin/bash claude
    install -m 0755 "$claude_bin" "$rootfs/usr/local/bin/claude"
    install -d -o "$sandbox_uid" -g "$sandbox_uid" -m 0755 \
        "$rootfs/home/claude/.claude" "$rootfs/home/claude/.claude/projects" "$rootfs/home/claude/.claude-mem"

    # Package caches and lists only make the image bigger.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log

    echo "writing $out"
    tar --numeric-owner -C "$rootfs" -cf "$out.partial" .
    mv "$out.partial" "$out"
}

main "$@"
