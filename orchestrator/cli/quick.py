"""The quick path: a well-formed command line of a command that asks the running daemon, read
without typer (issue 15: in the lab's guest typer's import and its command tree took 0.15-0.2 s
of a 0.45-0.55 s `mplsorch status` or `sessions` page). It takes only what it reads exactly as
typer would: the command's words, its options as `--name VALUE` or `--name=VALUE` (each at most
once), flags as `--name`, integers as decimal digits within their minimum, and its arguments.
Anything else (`--help`, an unknown or repeated option, a value that starts with `-`, a bad
number, `--`, a missing or extra argument) is left to typer, whose help and errors stay the
command's own. The commands' bodies are `asking.py`'s, the same typer runs; the options are
typer's (`options.py`, `operate.py`): tests/unit/test_cli_quick.py checks every one of them
against typer's own command tree."""

from __future__ import annotations

import errno
import os
import sys

from orchestrator.cli import asking

TYPE_CHECKING = False  # typing's own costs an import: not on the quick path
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

Value = str | int | bool | None


class Number:
    """An integer option or argument: decimal digits, at least `minimum`."""

    __slots__ = ("minimum",)

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum


FLAG = "flag"  # a boolean option, False unless given
TEXT = "text"  # a string option, None unless given
Kind = str | Number


class Command:
    """One asking command: its body, its options (name -> the body's parameter, its kind, its
    default) and its arguments (parameter, kind), in order. (Plain classes: dataclasses would
    import inspect, and typing's NamedTuple typing, both costly on this path.)"""

    __slots__ = ("run", "options", "arguments")

    def __init__(
        self,
        run: Callable[..., None],
        options: Mapping[str, tuple[str, Kind, Value]],
        arguments: tuple[tuple[str, Kind], ...] = (),
    ) -> None:
        self.run = run
        self.options = options
        self.arguments = arguments


ASKING: dict[str, tuple[str, Kind, Value]] = {
    "--json": ("json_output", FLAG, False),
    "--socket": ("socket", TEXT, None),
    "--config": ("config", TEXT, None),
}

COMMANDS: dict[tuple[str, ...], Command] = {
    ("status",): Command(asking.status, ASKING),
    ("labels",): Command(asking.labels, ASKING),
    ("routes",): Command(asking.routes, ASKING),
    ("sessions",): Command(
        asking.sessions,
        {**ASKING, "--limit": ("limit", Number(1), None), "--offset": ("offset", Number(0), 0)},
    ),
    ("sessions", "flush"): Command(
        asking.flush, {**ASKING, "--server": ("server", TEXT, None), "--client": ("client", TEXT, None)}
    ),
    ("servers",): Command(asking.servers, ASKING),
    ("servers", "drain"): Command(asking.drain, ASKING, (("name", TEXT),)),
    ("servers", "enable"): Command(asking.enable, ASKING, (("name", TEXT),)),
    # W below 0 is typer's to read ("-1" looks like an option); the daemon refuses it anyway.
    ("servers", "weight"): Command(asking.weight, ASKING, (("name", TEXT), ("value", Number(0)))),
    ("cluster", "ready"): Command(asking.cluster_ready, ASKING),
    ("cluster", "leave"): Command(asking.cluster_leave, ASKING),
}


def parse(argv: list[str]) -> tuple[Command, dict[str, Value]] | None:
    """The command and its body's keyword arguments, or None when typer must read `argv`."""
    words = tuple(argv[:2])
    command = COMMANDS.get(words)
    if command is None:
        words = words[:1]
        command = COMMANDS.get(words)
    if command is None:
        return None
    kwargs: dict[str, Value] = {param: default for param, _, default in command.options.values()}
    given: set[str] = set()
    arguments: list[str] = []
    rest = argv[len(words) :]
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("-"):
            arguments.append(token)
            continue
        name, equals, value = token.partition("=")
        spec = command.options.get(name)
        if spec is None or name in given:
            return None
        given.add(name)
        param, kind, _ = spec
        if kind == FLAG:
            if equals:
                return None
            kwargs[param] = True
            continue
        if not equals:
            if i == len(rest):
                return None
            value = rest[i]
            i += 1
        read = _read(value, kind)
        if read is None:
            return None
        kwargs[param] = read
    if len(arguments) != len(command.arguments):
        return None
    for token, (param, kind) in zip(arguments, command.arguments):
        read = _read(token, kind)
        if read is None:
            return None
        kwargs[param] = read
    return command, kwargs


def _read(value: str, kind: Kind) -> str | int | None:
    if value.startswith("-"):
        return None
    if isinstance(kind, Number):
        if not (value.isascii() and value.isdigit()) or int(value) < kind.minimum:
            return None
        return int(value)
    return value


def run(argv: list[str]) -> bool:
    """Run `argv` on the quick path if it can take it (False: it cannot, nothing was done). Exits
    as typer would: the body's SystemExit, 1 when stdout is a closed pipe, 130 on SIGINT."""
    parsed = parse(argv)
    if parsed is None:
        return False
    command, kwargs = parsed
    try:
        command.run(**kwargs)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        # Like typer: exit 1, and no second error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None
    return True
