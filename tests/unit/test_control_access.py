"""Who may use the control socket (issue 13, item 7): root only by default (mode 0600 and the
peer's uid checked), or root and the members of `node.control_group` (mode 0660 with that group,
the peer's primary or supplementary groups checked); a group that does not exist is a
configuration error. The end-to-end cases connect from a process of another user."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.examples import example
from orchestrator.config.load import ConfigError, parse_config
from orchestrator.config.model import BalancerConfig
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.control import ControlServer, peer_groups
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import EXAMPLE, balancer_daemon, config

NOBODY = 65534


def other_group() -> grp.struct_group:
    """A group of this host that is not root's."""
    return next(g for g in grp.getgrall() if g.gr_gid != 0)


async def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": request.get("cmd")}


def ask_as(path: str, gid: int, extra_groups: list[int]) -> str:
    """Connect as user nobody with primary group `gid` and `extra_groups` (a forked child that
    drops root): the answer line, or EACCES when the file mode refused the connect."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 0
        try:
            os.close(read_end)
            os.setgroups(extra_groups)
            os.setgid(gid)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(path)
                except PermissionError:
                    os.write(write_end, b"EACCES")
                else:
                    # A refused peer's answer may come (and the daemon close) before the request goes.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        sock.sendall(b'{"cmd": "status"}\n')
                    os.write(write_end, sock.makefile("rb").readline().strip())
        except BaseException as exc:  # said on the pipe, so the parent's assertion shows it
            os.write(write_end, f"child failed: {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        out = answer.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def serve_and_ask(group: str | None, clients: list[tuple[int, list[int]]], mode: int | None = None) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # nobody must reach the socket file itself
        path = os.path.join(tmp, "mplsorch.sock")

        async def scenario() -> list[str]:
            server = ControlServer(path, echo, group)
            await server.start()
            if mode is not None:
                os.chmod(path, mode)  # the second lock: the peer check, with the mode opened
            try:
                return [await asyncio.to_thread(ask_as, path, gid, extra) for gid, extra in clients]
            finally:
                await server.stop()

        return asyncio.run(scenario())


def test_root_only_by_default_mode_0600() -> None:
    group = other_group()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")

        async def start() -> os.stat_result:
            server = ControlServer(path, echo)
            await server.start()
            st = os.stat(path)
            await server.stop()
            return st

        st = asyncio.run(start())
    assert stat.S_IMODE(st.st_mode) == 0o600
    # A member of another group, the mode opened by hand: the peer check still refuses.
    answers = serve_and_ask(None, [(group.gr_gid, [])], mode=0o666)
    assert [json.loads(a) for a in answers] == [{"error": "the control socket is for root only"}]
    assert serve_and_ask(None, [(group.gr_gid, [])]) == ["EACCES"]


def test_a_control_group_gives_0660_and_admits_its_members_only() -> None:
    group = other_group()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")

        async def start() -> os.stat_result:
            server = ControlServer(path, echo, group.gr_name)
            await server.start()
            st = os.stat(path)
            await server.stop()
            return st

        st = asyncio.run(start())
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    outsider = next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, group.gr_gid))
    answers = serve_and_ask(
        group.gr_name,
        [
            (group.gr_gid, []),  # primary group
            (outsider, [group.gr_gid]),  # supplementary group
            (outsider, []),  # neither: the mode refuses the connect
        ],
    )
    assert answers[:2] == ['{"ok": "status"}', '{"ok": "status"}'] and answers[2] == "EACCES"
    # The mode opened by hand: a non-member still gets the peer check's refusal.
    [refused] = serve_and_ask(group.gr_name, [(outsider, [])], mode=0o666)
    assert json.loads(refused) == {"error": f"the control socket is for root and group {group.gr_name} only"}


def test_the_peer_check_reads_supplementary_groups_from_proc(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tx\nGroups:\t4 27 1001 \nUid:\t1000\n")
    assert peer_groups(42, str(tmp_path)) == {4, 27, 1001}
    assert peer_groups(43, str(tmp_path)) == set()  # gone: grants nothing
    group = other_group()
    (tmp_path / "42" / "status").write_text(f"Groups:\t{group.gr_gid}\n")
    server = ControlServer(str(tmp_path / "s.sock"), echo, group.gr_name, proc=str(tmp_path))
    assert server.allowed(42, 1000, 1000) and server.allowed(1, 0, 0)
    assert not server.allowed(43, 1000, 1000)
    assert ControlServer("x", echo, proc=str(tmp_path)).allowed(42, 1000, group.gr_gid) is False


def test_control_group_is_validated_as_an_existing_group() -> None:
    group = other_group()
    text = example("balancer", {"node.control_group": group.gr_name})
    cfg = parse_config(text, "lb.yaml")
    assert isinstance(cfg, BalancerConfig) and cfg.node.control_group == group.gr_name
    assert cfg.to_dict()["node"]["control_group"] == group.gr_name
    assert parse_config(EXAMPLE, "lb.yaml").node.control_group is None
    with pytest.raises(ConfigError) as raised:
        parse_config(text.replace(f"control_group: {group.gr_name}", "control_group: no-such-group-x"), "lb.yaml")
    assert str(raised.value).endswith("node.control_group: no group 'no-such-group-x' on this host")
    assert str(raised.value).startswith("lb.yaml:")


def test_a_reload_that_changes_control_group_applies_it_at_once() -> None:
    """The daemon's reload hands the new group to the running socket: 0660 with it, then 0600."""
    group = other_group()
    d = balancer_daemon(config(), FakeProvider(["lan0", "fab0"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")

        async def scenario() -> list[tuple[int, int]]:
            d.control = ControlServer(path, echo)
            await d.control.start()
            seen = [(stat.S_IMODE(os.stat(path).st_mode), os.stat(path).st_gid)]
            for cfg in (config({"node.control_group": group.gr_name}), config()):

                def reload(cfg: BalancerConfig = cfg) -> None:
                    d.config = cfg

                d.reload = reload  # type: ignore[method-assign]
                d.do_reload()
                seen.append((stat.S_IMODE(os.stat(path).st_mode), os.stat(path).st_gid))
            await d.control.stop()
            return seen

        seen = asyncio.run(scenario())
    assert isinstance(d, BalancerDaemon)
    assert seen == [(0o600, os.getgid()), (0o660, group.gr_gid), (0o600, os.getgid())]


def test_a_group_the_daemon_may_not_give_leaves_the_socket_root_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As under the shipped unit without `Group=`: no CAP_CHOWN, not a member of the group."""
    group = other_group()

    def denied(path: Any, uid: int, gid: int) -> None:
        if gid != os.getgid():
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", denied)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")

        async def start() -> tuple[int, str | None]:
            server = ControlServer(path, echo, group.gr_name)
            await server.start()
            mode = stat.S_IMODE(os.stat(path).st_mode)
            await server.stop()
            return mode, server.group

        assert asyncio.run(start()) == (0o600, None)
    assert caplog.messages == [
        f"control socket: cannot give it group {group.gr_name} (Operation not permitted); the socket stays root-only"
    ]
