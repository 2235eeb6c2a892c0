#!/bin/sh
# install-host-sshd.sh: make OpenSSH's server binary available on the host for casnix's
# ssh-ng end-to-end tests.
#
# Installs Debian's openssh-server (and ssh-keygen with it, from openssh-client) when
# /usr/sbin/sshd or ssh-keygen is missing. The tests never use the system's ssh service:
# each runs an sshd of its own on a loopback port with its own configuration and keys
# (nixtest.StartSSHD). So that installing the package does not start a system sshd, the
# install runs with a policy-rc.d that forbids starting services (an existing policy-rc.d
# is left alone). Idempotent: with sshd present it does nothing and touches no network.
set -eu

if [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null 2>&1 && command -v ssh >/dev/null 2>&1; then
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	echo "install-host-sshd.sh: need root to install openssh-server" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
made_policy=""
if ! [ -e "$policy" ]; then
	printf '#!/bin/sh\n# Written by casnix tests/nixenv/install-host-sshd.sh; removed after the install.\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# apt-get update only when the package lists do not know the package yet.
if ! apt-cache show openssh-server >/dev/null 2>&1; then
	apt-get update -q
fi
apt-get install -y -q --no-install-recommends openssh-server openssh-client

[ -x /usr/sbin/sshd ] || { echo "install-host-sshd.sh: /usr/sbin/sshd still missing" >&2; exit 1; }
command -v ssh-keygen >/dev/null 2>&1 || { echo "install-host-sshd.sh: ssh-keygen still missing" >&2; exit 1; }
