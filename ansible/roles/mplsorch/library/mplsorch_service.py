#!/usr/bin/python
# -*- coding: utf-8 -*-
# Part of mplsorch (Apache-2.0). An Ansible module of the mplsorch role.
"""The fallback supervisor, for nodes without systemd (containers, the netns lab): runs
`mplsorch run` detached in its own session with a pid file, its output appended to a log file;
started means its control socket answers, reloaded means SIGHUP and the daemon's answer in the
log. Nothing restarts the daemon if it dies: that is what systemd (the unit in templates/) is for."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: mplsorch_service
short_description: Run mplsorch without systemd (pid file, log file, SIGHUP reload)
description:
  - I(state=started) starts the command detached (new session, stdin from /dev/null, output appended to
    I(log_file)), writes I(pid_file) and waits until I(ready_path) (the control socket) exists; it fails
    with the daemon's own words if the daemon exits first (for example exit 4, node not ready).
  - I(state=reloaded) sends SIGHUP and waits for the daemon's answer in the log (C(configuration reloaded),
    or C(reload rejected), which fails). I(state=restarted) stops and starts; I(state=stopped) sends SIGTERM.
  - A process counts as running when the pid in I(pid_file) is alive with I(command) as its command line.
  - Supports check mode.
options:
  command: {description: The daemon's command line (its first element an absolute path)., type: list, elements: str, required: true}
  pid_file: {description: Where the daemon's pid is kept., type: path, required: true}
  log_file: {description: The daemon's output, appended to., type: path, required: true}
  ready_path: {description: Exists once the daemon runs (its control socket)., type: path, required: true}
  state: {description: What to do., type: str, choices: [started, restarted, reloaded, stopped], default: started}
  restart: {description: With I(state=started), restart a running daemon (new code was installed)., type: bool, default: false}
  timeout: {description: Seconds to wait for a start, a reload's answer or a stop., type: int, default: 300}
"""

RETURN = r"""
pid: {description: The daemon's pid (0 when none runs)., type: int, returned: always}
"""

ANSWERS = ("configuration reloaded", "reload rejected")


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def running_pid(pid_file, command):
    """The pid of our daemon, or 0. A script's command line starts with its interpreter."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return 0
    args = cmdline(pid)
    if args is None or args[-len(command) :] != command:
        return 0
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                return 0
    except (OSError, IndexError):
        return 0
    return pid


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_since(path, offset, limit=4000):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


class Service(object):
    def __init__(self, module):
        self.m = module
        self.p = module.params
        self.command = self.p["command"]

    def pid(self):
        return running_pid(self.p["pid_file"], self.command)

    def fail(self, msg, offset=None, **kw):
        if offset is not None:
            kw["log"] = log_since(self.p["log_file"], offset)
        self.m.fail_json(msg=msg, **kw)

    def start(self):
        p = self.p
        for path in (p["pid_file"], p["log_file"]):
            directory = os.path.dirname(path)
            if not os.path.isdir(directory):
                os.makedirs(directory, 0o700)
        if os.path.lexists(p["ready_path"]):
            os.unlink(p["ready_path"])  # a stale socket of a daemon that is gone
        offset = log_size(p["log_file"])
        with open(p["log_file"], "ab") as log, open(os.devnull, "rb") as devnull:
            proc = subprocess.Popen(
                self.command, stdin=devnull, stdout=log, stderr=log, cwd="/", start_new_session=True, close_fds=True
            )
        with open(p["pid_file"] + ".tmp", "w") as f:
            f.write("%d\n" % proc.pid)
        os.rename(p["pid_file"] + ".tmp", p["pid_file"])
        deadline = time.monotonic() + p["timeout"]
        while not os.path.exists(p["ready_path"]):
            status = proc.poll()
            if status is not None:
                self.fail(
                    "%s exited with status %d while starting" % (" ".join(self.command), status), offset, rc=status
                )
            if time.monotonic() > deadline:
                self.fail(
                    "%s did not open %s within %d s (left running, pid %d)"
                    % (" ".join(self.command), p["ready_path"], p["timeout"], proc.pid),
                    offset,
                )
            time.sleep(0.2)
        return proc.pid

    def stop(self, pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.p["timeout"]
        while running_pid(self.p["pid_file"], self.command) == pid:
            if time.monotonic() > deadline:
                self.fail("pid %d did not stop within %d s of SIGTERM" % (pid, self.p["timeout"]))
            time.sleep(0.2)

    def reload(self, pid):
        offset = log_size(self.p["log_file"])
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + self.p["timeout"]
        while True:
            new = log_since(self.p["log_file"], offset, limit=1 << 20)
            answer = next((line for line in new.splitlines() if any(a in line for a in ANSWERS)), None)
            if answer is not None:
                if ANSWERS[1] in answer:
                    self.fail("mplsorch (pid %d) rejected the reload: %s" % (pid, answer), offset, pid=pid)
                return answer
            if running_pid(self.p["pid_file"], self.command) != pid:
                self.fail("mplsorch (pid %d) exited after SIGHUP" % pid, offset, pid=0)
            if time.monotonic() > deadline:
                self.fail("no answer to SIGHUP from pid %d within %d s" % (pid, self.p["timeout"]), offset, pid=pid)
            time.sleep(0.2)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            command=dict(type="list", elements="str", required=True),
            pid_file=dict(type="path", required=True),
            log_file=dict(type="path", required=True),
            ready_path=dict(type="path", required=True),
            state=dict(type="str", default="started", choices=["started", "restarted", "reloaded", "stopped"]),
            restart=dict(type="bool", default=False),
            timeout=dict(type="int", default=300),
        ),
        supports_check_mode=True,
    )
    svc = Service(module)
    state = module.params["state"]
    if state == "started" and module.params["restart"]:
        state = "restarted"
    pid = svc.pid()
    if state == "started" and pid:
        module.exit_json(changed=False, pid=pid, msg="running")
    if state == "stopped" and not pid:
        module.exit_json(changed=False, pid=0, msg="not running")
    if state == "reloaded" and not pid:
        module.exit_json(changed=False, pid=0, msg="not running: nothing to reload")
    if module.check_mode:
        verb = {
            "started": "start",
            "restarted": "restart" if pid else "start",
            "reloaded": "reload",
            "stopped": "stop",
        }[state]
        module.exit_json(changed=True, pid=pid, msg="would %s" % verb)
    if state == "reloaded":
        answer = svc.reload(pid)
        module.exit_json(changed=True, pid=pid, msg=answer)
    if state in ("restarted", "stopped") and pid:
        svc.stop(pid)
    if state == "stopped":
        module.exit_json(changed=True, pid=0, msg="stopped")
    module.exit_json(changed=True, pid=svc.start(), msg="restarted" if pid else "started")


if __name__ == "__main__":
    main()
