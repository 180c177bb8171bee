"""Configuration of both roles: the file formats of templates/balancer.example.yaml and
templates/server.example.yaml, parsed into frozen dataclasses and validated. `load_config` and
`parse_config` read `role` first and return a BalancerConfig or a ServerConfig; a daemon that needs
one role uses `load_balancer_config` / `load_server_config`, which refuse the other. Errors are
`ConfigError` ("FILE:LINE: KEY.PATH: message")."""

from orchestrator.config.load import (
    ConfigError, load_balancer_config, load_config, load_server_config, parse_config,
)
from orchestrator.config.model import (
    Admission, BalancerConfig, FailPolicy, Interfaces, LabelAllocation, LabelConfig, NfqueueConfig, NodeConfig,
    Pool, Protocol, RateLimit, RateUnit, RefuseWith, Role, Scheduler, Server, Service, SessionKeyKind,
)
from orchestrator.config.server import ServerConfig, ServerNode, ServerQueue, Setup, Vip

__all__ = [
    "Admission", "BalancerConfig", "ConfigError", "FailPolicy", "Interfaces", "LabelAllocation", "LabelConfig",
    "NfqueueConfig", "NodeConfig", "Pool", "Protocol", "RateLimit", "RateUnit", "RefuseWith", "Role", "Scheduler",
    "Server", "ServerConfig", "ServerNode", "ServerQueue", "Service", "SessionKeyKind", "Setup", "Vip",
    "load_balancer_config", "load_config", "load_server_config", "parse_config",
]
