#!/usr/bin/python
# -*- coding: utf-8 -*-
# Part of mplsorch (Apache-2.0). An Ansible module of the mplsorch role.
"""Install an mplsorch wheel into a virtual environment on the node, idempotently: the wheel's
sha256 is kept in the venv, so the same wheel is never installed twice (pip itself would call
a rebuilt wheel of the same version "already satisfied", and asking pip costs seconds)."""

from __future__ import annotations

import glob
import hashlib
import json
import os

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: mplsorch_venv
short_description: Install an mplsorch wheel into a virtual environment
description:
  - Creates the virtual environment when it is missing and installs the wheel with pip (its
    dependencies from an index or from I(find_links)). Installs again only when the wheel differs
    (by sha256) from the one installed last. Supports check mode.
options:
  venv: {description: The virtual environment's directory., type: path, required: true}
  wheel: {description: The wheel file on the node., type: path, required: true}
  python: {description: The interpreter that creates the venv., type: str, default: /usr/bin/python3}
  find_links: {description: Directories on the node with wheels of the dependencies (pip --find-links)., type: list, elements: path, default: []}
  index: {description: Use the package index (false - pip --no-index - takes everything from find_links)., type: bool, default: true}
  extra_args: {description: More pip install arguments., type: list, elements: str, default: []}
  extras: {description: "The package's extras to install with it (e.g. [cluster]: etcd's client for cluster mode).", type: list, elements: str, default: []}
  pip_wheel:
    description:
      - A pip wheel on the node (a path, or a glob whose newest match is taken) to run pip from, so that
        the venv is made without pip (C(python -m venv --without-pip)): no ensurepip, a smaller venv and a
        much faster first install. Empty - the venv gets its own pip.
    type: str
    default: ""
"""

RETURN = r"""
version: {description: The installed mplsorch version (from the wheel's name)., type: str, returned: always}
executable: {description: The venv's mplsorch command., type: str, returned: always}
"""

STAMP = ".mplsorch-wheel.json"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            venv=dict(type="path", required=True),
            wheel=dict(type="path", required=True),
            python=dict(type="str", default="/usr/bin/python3"),
            find_links=dict(type="list", elements="path", default=[]),
            index=dict(type="bool", default=True),
            extra_args=dict(type="list", elements="str", default=[]),
            extras=dict(type="list", elements="str", default=[]),
            pip_wheel=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    p = module.params
    venv, wheel = p["venv"], p["wheel"]
    name = os.path.basename(wheel)
    version = name.split("-")[1] if name.count("-") >= 4 else ""
    executable = os.path.join(venv, "bin", "mplsorch")
    result = dict(changed=False, version=version, executable=executable)
    if not os.path.isfile(wheel):
        if module.check_mode:  # the copy before us would have put it there
            module.exit_json(msg="would install %s into %s" % (name, venv), **dict(result, changed=True))
        module.fail_json(msg="no wheel at %s" % wheel, **result)
    wanted = {"wheel": name, "sha256": sha256(wheel)}
    if p["extras"]:  # absent without extras: installs of earlier versions keep their stamp
        wanted["extras"] = sorted(p["extras"])
    stamp = os.path.join(venv, STAMP)
    try:
        with open(stamp) as f:
            installed = json.load(f)
    except (OSError, ValueError):
        installed = None
    if installed == wanted and os.access(executable, os.X_OK):
        module.exit_json(msg="%s is installed in %s" % (name, venv), **result)
    result["changed"] = True
    result["diff"] = [
        {
            "before_header": stamp,
            "after_header": stamp,
            "before": json.dumps(installed, indent=1) + "\n" if installed else "",
            "after": json.dumps(wanted, indent=1) + "\n",
        }
    ]
    if module.check_mode:
        module.exit_json(msg="would install %s into %s" % (name, venv), **result)

    def run(argv):
        rc, out, err = module.run_command(
            argv, environ_update={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        )
        if rc != 0:
            module.fail_json(msg="%s failed (%d)" % (" ".join(argv), rc), stdout=out, stderr=err, **result)
        return out

    python = os.path.join(venv, "bin", "python")
    pip_wheel = None
    if p["pip_wheel"]:
        found = sorted(
            glob.glob(p["pip_wheel"]),
            key=lambda w: [
                (int(x), "") if x.isdigit() else (-1, x) for x in os.path.basename(w).split("-")[1].split(".")
            ],
        )
        if not found:
            module.fail_json(msg="no pip wheel matches %s" % p["pip_wheel"], **result)
        pip_wheel = found[-1]
    if not os.access(python, os.X_OK):
        run([p["python"], "-m", "venv"] + (["--without-pip"] if pip_wheel else []) + [venv])
    # pip run from its wheel (pip supports that for bootstrapping) installs into the venv it runs in.
    pip = [python] + ([os.path.join(pip_wheel, "pip")] if pip_wheel else ["-m", "pip"]) + ["install", "--quiet"]
    pip += ["--no-index"] if not p["index"] else []
    for link in p["find_links"]:
        pip += ["--find-links", link]
    pip += p["extra_args"]
    was_installed = installed is not None or os.path.exists(executable)
    target = wheel + ("[%s]" % ",".join(sorted(p["extras"])) if p["extras"] else "")
    run(pip + [target])  # new dependencies (the extras' too); the package itself if it was not there
    if was_installed:  # a rebuilt wheel of the same version: pip calls it "already satisfied"
        run(pip + ["--force-reinstall", "--no-deps", wheel])
    with open(stamp + ".tmp", "w") as f:
        json.dump(wanted, f)
    os.rename(stamp + ".tmp", stamp)
    module.exit_json(msg="installed %s into %s" % (name, venv), **result)


if __name__ == "__main__":
    main()
