"""Balancer configuration: the file format of templates/balancer.example.yaml, parsed into frozen
dataclasses and validated (`load_config`, `parse_config`; errors are `ConfigError`)."""

from orchestrator.config.load import ConfigError, load_config, parse_config
from orchestrator.config.model import (
    Admission, BalancerConfig, FailPolicy, Interfaces, LabelAllocation, LabelConfig, NfqueueConfig, NodeConfig,
    Pool, Protocol, RateLimit, RateUnit, RefuseWith, Role, Scheduler, Server, Service, SessionKeyKind,
)

__all__ = [
    "Admission", "BalancerConfig", "ConfigError", "FailPolicy", "Interfaces", "LabelAllocation", "LabelConfig",
    "NfqueueConfig", "NodeConfig", "Pool", "Protocol", "RateLimit", "RateUnit", "RefuseWith", "Role", "Scheduler",
    "Server", "Service", "SessionKeyKind", "load_config", "parse_config",
]
