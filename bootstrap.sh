#!/usr/bin/env bash
# Set up a Debian 12 host for mplsorch (idempotent) and run one job:
#   bash bootstrap.sh demo    the main job: `mplsorch lab demo` in the kernel lab
#   bash bootstrap.sh test    every test: unit tests here, netns tests in the kernel lab
#   bash bootstrap.sh setup   only install
# Needs root (the lab builds network namespaces; apt installs the lab's kernel and QEMU).
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-setup}"

# Debian packages: the kernel source and toolchain for the lab's User-Mode Linux kernel (the fast
# backend when this host's kernel has no MPLS routing; orchestrator/lab/uml.py BUILD_PACKAGES);
# QEMU and Debian's kernel for the lab VM (the slow backend, kept alive by one smoke test); the
# tools the lab and tests use to build and check topologies; openssh-server: the Ansible roll-out
# test runs an sshd in every lab node (netns_tests/test_ansible.py); etcd-server: the cluster tests
# start their own etcd on loopback (tests/unit/test_cluster_etcd.py; docs/scale.md).
apt_packages="linux-source-6.1 build-essential flex bison bc libelf-dev
  qemu-system-x86 linux-image-amd64 busybox-static kmod nftables iproute2 tcpdump
  curl iputils-ping ipvsadm python3 python3-venv openssh-server ethtool etcd-server"
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
# Editable as a plain path entry (compat): setuptools' default editable finder is imported by
# `site` at every Python start (pathlib, urllib.parse, ipaddress...), about 0.06-0.08 s of each
# `mplsorch` command in the lab's guest (issue 15: a sessions page under 1 s at 500,000).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,lab,cluster]" \
  --config-settings editable_mode=compat
# Our modules' bytecode written once: where PYTHONDONTWRITEBYTECODE is set, every command would
# compile them again (a module edited later is compiled in memory, as without these).
.venv/bin/python -m compileall -q orchestrator >/dev/null
# The wheelhouse of the Ansible roll-out test (netns_tests/test_ansible.py): mplsorch's wheel, built
# from this tree, and its dependencies' (and setuptools/wheel, to build it offline). The lab VM has
# no network, and building the wheel in its emulated CPU takes a quarter of an hour.
rm -f .wheelhouse/mplsorch-*.whl
SOURCE_DATE_EPOCH=315532800 .venv/bin/python -m pip wheel -q --disable-pip-version-check -w .wheelhouse . \
  "setuptools>=68" wheel

# Our route protocol number gets its name, so `ip route` shows "proto mplsorch".
install -D -m 0644 templates/rt_protos.d/mplsorch.conf /etc/iproute2/rt_protos.d/mplsorch.conf

export PATH="$PWD/.venv/bin:$PATH"
# The lab's UML kernel: built once (about 5 minutes on 2 cores), again only when Debian's source or
# orchestrator/lab/uml_kernel.config changes.
mplsorch lab kernel build

case "$job" in
  setup) ;;
  demo) exec mplsorch lab demo ;;
  test)
    # Lint, layout and types first: they take seconds (configuration in pyproject.toml).
    ruff check .
    ruff format --check .
    mypy
    python -m pytest -q tests
    # The lab itself, from the host: exit status and output through the guest, SIGTERM, leftovers.
    python -m pytest -q -p no:cacheprovider lab_tests
    # The VM backend stays alive: one boot of the emulated VM with the hand-built reference session.
    vm=0
    mplsorch lab run --backend vm -- python -m pytest -q -p no:cacheprovider netns_tests/test_reference_session.py || vm=$?
    # Every netns module in a lab of its own, one UML lab per core, one combined summary.
    suite=0
    mplsorch lab pytest netns_tests || suite=$?
    [ "$vm" -eq 0 ] || echo "bootstrap: the VM backend's smoke test failed (exit $vm)" >&2
    [ "$vm" -eq 0 ] && [ "$suite" -eq 0 ] || exit 1
    ;;
  *) echo "usage: bash bootstrap.sh [setup|demo|test]" >&2; exit 2 ;;
esac
