"""Health checks of the servers: a pure rise/fall state machine (`state`), asyncio checkers
(`checks`: TCP connect, HTTP GET, UDP request/response), the runner that schedules them on the
daemon's loop (`runner`), and what the schedulers need from them (`scheduling`)."""

from orchestrator.health.checks import check_http, check_tcp, check_udp, run_check
from orchestrator.health.runner import HealthRunner, Probe, probes_of, targets_of
from orchestrator.health.scheduling import HealthView, apply_health
from orchestrator.health.state import (
    CheckResult, HealthEvent, HealthMachine, HealthState, HealthTable, ServerHealth, Target,
)

__all__ = [
    "CheckResult", "HealthEvent", "HealthMachine", "HealthRunner", "HealthState", "HealthTable", "HealthView",
    "Probe", "ServerHealth", "Target", "apply_health", "check_http", "check_tcp", "check_udp", "probes_of",
    "run_check", "targets_of",
]
