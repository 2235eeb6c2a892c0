#!/bin/sh
# install-host-podman.sh: make podman (rootful, crun) available on the host for casnix's
# container end-to-end test (tests/container_test.go), from Debian's archive, with runc
# (crun refuses hybrid cgroup layouts).
# Idempotent: with podman present it does nothing and touches no network. Retries while
# another apt holds the dpkg lock.
set -eu

if command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-host-podman.sh: need root to install podman" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show podman >/dev/null 2>&1; then
	apt-get update -q
fi
i=0
until apt-get install -y -q --no-install-recommends podman runc uidmap fuse-overlayfs; do
	i=$((i + 1))
	[ "$i" -lt 20 ] || exit 1
	echo "install-host-podman.sh: apt-get failed (dpkg lock?), retrying in 15s" >&2
	sleep 15
done
command -v podman >/dev/null 2>&1 || { echo "install-host-podman.sh: podman still missing" >&2; exit 1; }
