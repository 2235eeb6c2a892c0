#!/bin/sh
# install-host-nix.sh: make real Nix usable on the host for casnix's end-to-end tests.
#
# Installs Debian bookworm's nix-bin (Nix 2.8, the oldest client casnix supports) when
# nix-store is missing, and busybox-static (the builder of the test derivations) when
# /bin/busybox is missing. Idempotent: a second run with everything present does nothing
# and touches no network.
#
# Newer Nix versions (trixie 2.26, sid 2.34) need a newer libc and will live in debootstrap
# roots made by sibling scripts in this directory (e.g. nixenv/make-root.sh SUITE); this
# script only handles the host.
set -eu

need=""
command -v nix-store >/dev/null 2>&1 || need="$need nix-bin"
# busybox-static installs /bin/busybox; the dynamic busybox package would not do as a
# builder inside a store that lacks its libraries (ldd exits non-zero for a static binary).
if ! [ -x /bin/busybox ] || LC_ALL=C ldd /bin/busybox >/dev/null 2>&1; then
	need="$need busybox-static"
fi

if [ -z "$need" ]; then
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	echo "install-host-nix.sh: need root to install:$need" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# apt-get update only when the package lists do not know the packages yet.
for p in $need; do
	if ! apt-cache show "$p" >/dev/null 2>&1; then
		apt-get update -q
		break
	fi
done
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $need

command -v nix-store >/dev/null 2>&1 || { echo "install-host-nix.sh: nix-store still missing" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "install-host-nix.sh: /bin/busybox still missing" >&2; exit 1; }
