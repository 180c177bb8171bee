"""Configuration of both roles: the file formats of templates/balancer.example.yaml and
templates/server.example.yaml, parsed into frozen dataclasses and validated. `load_config` and
`parse_config` read `role` first and return a BalancerConfig or a ServerConfig; a daemon that needs
one role uses `load_balancer_config` / `load_server_config`, which refuse the other. Errors are
`ConfigError` ("FILE:LINE: KEY.PATH: message").

The dataclasses are imported here at once; the loaders (and with them the YAML library) only when
first asked for, so the pure decision core can use the dataclasses without loading a parser."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orchestrator.config.model import (
    Admission,
    BalancerConfig,
    FailPolicy,
    Interfaces,
    LabelAllocation,
    LabelConfig,
    NfqueueConfig,
    NodeConfig,
    Pool,
    Protocol,
    RateLimit,
    RateUnit,
    RefuseWith,
    Role,
    Scheduler,
    Server,
    Service,
    SessionKeyKind,
)
from orchestrator.config.server_model import ServerConfig, ServerNode, ServerQueue, Setup, Vip

if TYPE_CHECKING:  # the checker sees the loaders' real types; at run time __getattr__ imports them
    from orchestrator.config.load import (
        ConfigError,
        load_balancer_config,
        load_config,
        load_server_config,
        parse_config,
    )

_LOADERS = {
    name: "orchestrator.config.load"
    for name in ("ConfigError", "load_balancer_config", "load_config", "load_server_config", "parse_config")
}

__all__ = [
    "Admission",
    "BalancerConfig",
    "ConfigError",
    "FailPolicy",
    "Interfaces",
    "LabelAllocation",
    "LabelConfig",
    "NfqueueConfig",
    "NodeConfig",
    "Pool",
    "Protocol",
    "RateLimit",
    "RateUnit",
    "RefuseWith",
    "Role",
    "Scheduler",
    "Server",
    "ServerConfig",
    "ServerNode",
    "ServerQueue",
    "Service",
    "SessionKeyKind",
    "Setup",
    "Vip",
    "load_balancer_config",
    "load_config",
    "load_server_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    """PEP 562: the loaders on first use (see the module docstring)."""
    if name in _LOADERS:
        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
