"""The operator's say over servers, kept apart from the configuration: drain and weight set at run
time (`mplsorch servers drain|enable|weight`). Pure data; the balancer core reads it when it
builds the pool a scheduler sees.

Drain lasts until `enable` (or a restart), across reloads, so an unrelated reload never sends new
sessions to a server under maintenance. An operator's weight lasts until a reload changes that
server's weight in the file (the file then wins) or a restart.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class AdminState(enum.StrEnum):
    ENABLED = "enabled"
    DRAINING = "draining"  # no new sessions; its sessions stay until they end


class BadCommand(ValueError):
    """An operator's command names something that does not exist or a value out of range: it
    changed nothing."""


@dataclass
class ServerAdmin:
    draining: set[str] = field(default_factory=set)
    # server -> (the file's weight when the operator set it, the operator's weight)
    _weights: dict[str, tuple[int, int]] = field(default_factory=dict)

    def configure(self, weights: Mapping[str, int]) -> None:
        """A (re)loaded configuration's servers and weights: forget servers it no longer has, and
        operator weights of servers whose configured weight changed."""
        self.draining &= set(weights)
        self._weights = {name: (base, w) for name, (base, w) in self._weights.items() if weights.get(name) == base}

    def state(self, server: str) -> AdminState:
        return AdminState.DRAINING if server in self.draining else AdminState.ENABLED

    def set_state(self, server: str, state: AdminState) -> None:
        if state is AdminState.DRAINING:
            self.draining.add(server)
        else:
            self.draining.discard(server)

    def weight(self, server: str, configured: int) -> int:
        entry = self._weights.get(server)
        return entry[1] if entry is not None and entry[0] == configured else configured

    def set_weight(self, server: str, configured: int, weight: int) -> None:
        if weight == configured:
            self._weights.pop(server, None)
        else:
            self._weights[server] = (configured, weight)


def check_server(name: object, known: Iterable[str]) -> str:
    """The server name of a command, or BadCommand naming it and the known ones."""
    names = sorted(set(known))
    if not isinstance(name, str) or name not in names:
        raise BadCommand(f"unknown server {name!r}; known: {', '.join(names)}")
    return name


def check_weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadCommand(f"bad weight {value!r}: an integer >= 0 (0 takes no new sessions)")
    return value
