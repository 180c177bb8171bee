#!/usr/bin/env bash
# Set up a Debian 12 host for mplsorch (idempotent) and run one job:
#   bash bootstrap.sh demo    the main job: `mplsorch lab demo` in the kernel lab
#   bash bootstrap.sh test    every test: unit tests here, netns tests in the kernel lab
#   bash bootstrap.sh setup   only install
# Needs root (the lab builds network namespaces; apt installs the lab's kernel and QEMU).
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-setup}"

# Debian packages: QEMU and Debian's kernel for the lab VM (virtme-ng boots it when this host's
# kernel has no MPLS routing), the tools the lab and tests use to build and check topologies;
# openssh-server: the Ansible roll-out test runs an sshd in every lab node (netns_tests/test_ansible.py).
apt_packages="qemu-system-x86 linux-image-amd64 busybox-static kmod nftables iproute2 tcpdump
  curl iputils-ping ipvsadm python3 python3-venv openssh-server"
missing=""
for pkg in $apt_packages; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "bootstrap: installing$missing" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

# The project in its own virtual environment (re-running only re-checks it).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,lab]"
# The wheelhouse of the Ansible roll-out test (netns_tests/test_ansible.py): mplsorch's wheel, built
# from this tree, and its dependencies' (and setuptools/wheel, to build it offline). The lab VM has
# no network, and building the wheel in its emulated CPU takes a quarter of an hour.
rm -f .wheelhouse/mplsorch-*.whl
SOURCE_DATE_EPOCH=315532800 .venv/bin/python -m pip wheel -q --disable-pip-version-check -w .wheelhouse . \
  "setuptools>=68" wheel

# Our route protocol number gets its name, so `ip route` shows "proto mplsorch".
install -D -m 0644 templates/rt_protos.d/mplsorch.conf /etc/iproute2/rt_protos.d/mplsorch.conf

export PATH="$PWD/.venv/bin:$PATH"
case "$job" in
  setup) ;;
  demo) exec mplsorch lab demo ;;
  test)
    python -m pytest -q tests
    exec mplsorch lab run -- python -m pytest -q -p no:cacheprovider netns_tests
    ;;
  *) echo "usage: bash bootstrap.sh [setup|demo|test]" >&2; exit 2 ;;
esac
