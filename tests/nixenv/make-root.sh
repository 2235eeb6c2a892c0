#!/bin/sh
# make-root.sh: make (or reuse) a Debian root holding a newer real Nix for casnix's
# end-to-end tests.
#
# Usage: make-root.sh SUITE [DIR]
#
#   SUITE  a Debian suite: trixie (Nix 2.26), sid (Nix 2.34), or bookworm (Nix 2.8)
#   DIR    where the root goes; default $CASNIX_ROOTS_DIR/SUITE, i.e.
#          /var/cache/casnix-tests/roots/SUITE
#
# The root is made by `debootstrap --variant=minbase` with nix-bin, busybox-static,
# libdbi-perl (without it debootstrap cannot resolve a virtual package nix-bin's perl
# bindings need) and openssh-client (for ssh-ng), from the Debian mirror that
# /etc/apt/sources.list.d/debian.sources names (or $CASNIX_DEBIAN_MIRROR). The .debs are
# kept in $CASNIX_DEB_CACHE (default /var/cache/casnix-tests/debs) for the next build.
#
# Idempotent: a root whose marker file (DIR/.casnix-root, written last) matches this
# script's package list and whose nix binaries are present is reused without touching the
# network; only its configuration (below) is refreshed when it differs. A missing, partial
# or outdated root is rebuilt in DIR.new and renamed to DIR when complete. Concurrent runs
# for the same DIR wait for each other (flock on DIR.lock).
#
# Configuration written into the root:
#   /etc/nix/nix.conf  nix-command and local-overlay-store enabled, builds as root
#                      (build-users-group empty), sandbox = false by default (override per
#                      command with --option sandbox true or NIX_CONFIG), the busybox
#                      builder made available to sandboxed builds (extra-sandbox-paths),
#                      no substituters (there is no network).
#   /nix/store, /nix/var, /.oldroot   mount points used by nixtest.Root, which runs commands
#                      in the root with pivot_root and binds a per-test /nix over /nix.
#
# On success it prints the root's directory on stdout.
set -eu

usage() { echo "usage: $0 SUITE [DIR]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
suite=$1
case $suite in
'' | */* | .*) usage ;;
esac
roots=${CASNIX_ROOTS_DIR:-/var/cache/casnix-tests/roots}
dir=${2:-$roots/$suite}
debs=${CASNIX_DEB_CACHE:-/var/cache/casnix-tests/debs}
packages=${CASNIX_ROOT_PACKAGES:-nix-bin,busybox-static,libdbi-perl,openssh-client}
# Bump when the way roots are made changes, to rebuild cached roots.
format=1
marker_want="casnix-root format=$format suite=$suite packages=$packages"

log() { echo "make-root.sh[$suite]: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, mounts)"
case $dir in
/*) ;;
*) dir=$(pwd)/$dir ;;
esac
dir=${dir%/}
if [ -z "$dir" ] || [ "$dir" = / ]; then die "refusing DIR /"; fi

mkdir -p "$(dirname "$dir")" "$debs"
# One make-root.sh at a time per DIR; the others wait, then find the root complete.
exec 9>"$dir.lock"
flock 9

# nix_conf prints the nix.conf of the root; $1 is the busybox path inside it.
nix_conf() {
	cat <<EOF
# Written by casnix tests/nixenv/make-root.sh; rewritten on every run.
experimental-features = nix-command local-overlay-store
build-users-group =
sandbox = false
sandbox-fallback = false
extra-sandbox-paths = $1
substituters =
require-sigs = false
fsync-metadata = false
warn-dirty = false
EOF
}

# busybox_in ROOT prints where the static busybox is inside ROOT, as seen from inside.
busybox_in() {
	for p in /bin/busybox /usr/bin/busybox; do
		if [ -f "$1$p" ] && [ -x "$1$p" ]; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

# is_complete ROOT succeeds when ROOT is a finished root of this script's kind.
is_complete() {
	[ -f "$1/.casnix-root" ] || return 1
	[ "$(cat "$1/.casnix-root")" = "$marker_want" ] || return 1
	for f in /usr/bin/nix /usr/bin/nix-store /usr/bin/nix-daemon /bin/sh; do
		[ -x "$1$f" ] || return 1
	done
	busybox_in "$1" >/dev/null
}

# configure ROOT writes the configuration into ROOT, touching files only when they change.
configure() {
	bb=$(busybox_in "$1") || die "no busybox in $1"
	mkdir -p "$1/etc/nix" "$1/nix/store" "$1/nix/var" "$1/.oldroot"
	nix_conf "$bb" >"$1/etc/nix/nix.conf.new"
	if cmp -s "$1/etc/nix/nix.conf.new" "$1/etc/nix/nix.conf"; then
		rm -f "$1/etc/nix/nix.conf.new"
	else
		mv -f "$1/etc/nix/nix.conf.new" "$1/etc/nix/nix.conf"
	fi
}

# remove_tree DIR deletes DIR, first detaching anything mounted below it (a killed
# debootstrap can leave its /proc and /sys mounts behind) and never crossing into another
# file system.
remove_tree() {
	[ -e "$1" ] || return 0
	# Mount points are field 5 of mountinfo (octal escapes for spaces; our paths have none).
	awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
		sort -r | while read -r m; do umount -l "$m" || true; done
	rm -rf --one-file-system "$1"
}

if is_complete "$dir"; then
	configure "$dir"
	echo "$dir"
	exit 0
fi

mirror=${CASNIX_DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list.d/debian.sources ]; then
	# The first URIs: of a stanza that is not the security archive.
	mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
		/etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
	mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
		/etc/apt/sources.list)
fi
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt (set CASNIX_DEBIAN_MIRROR)"
# A fresh Debian machine has no debootstrap: install it, as install-host-nix.sh installs Nix.
if ! command -v debootstrap >/dev/null 2>&1; then
	log "installing debootstrap"
	export DEBIAN_FRONTEND=noninteractive
	apt-cache show debootstrap >/dev/null 2>&1 || apt-get -o DPkg::Lock::Timeout=600 update -q >&2
	apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends debootstrap >&2 ||
		die "apt-get install debootstrap failed"
fi
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is still missing after apt-get install"

if [ -e "$dir" ]; then
	log "$dir is incomplete or outdated; rebuilding it"
	remove_tree "$dir"
fi
new=$dir.new
remove_tree "$new"
mkdir -p "$new"

log "debootstrap $suite from $mirror into $new (packages $packages)"
start=$(date +%s)
# In a private mount namespace, so that the /proc and /sys debootstrap mounts in the target
# vanish with it even when it is killed.
if ! unshare -m --propagation private \
	debootstrap --variant=minbase --include="$packages" --cache-dir="$debs" \
	"$suite" "$new" "$mirror" >"$new.log" 2>&1; then
	tail -n 40 "$new.log" >&2
	[ -f "$new/debootstrap/debootstrap.log" ] && tail -n 40 "$new/debootstrap/debootstrap.log" >&2
	die "debootstrap failed (full log: $new.log)"
fi
# The .debs live on in the cache directory; do not keep a second copy in the root.
find "$new/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -delete 2>/dev/null || true
configure "$new"
echo "$marker_want" >"$new/.casnix-root"
is_complete "$new" || die "$new is not complete after debootstrap (no nix or busybox?)"
mv "$new" "$dir"
rm -f "$new.log"
log "made $dir in $(($(date +%s) - start))s"
echo "$dir"
