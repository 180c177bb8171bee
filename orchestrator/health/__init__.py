"""Health checks of the servers: asyncio checkers (`checks`: TCP connect, HTTP GET, UDP
request/response) and the runner that schedules them on the daemon's loop (`runner`). The pure
rise/fall state machine and the view the schedulers read live in `orchestrator.core.health` (the
decision core must not import this package); they are re-exported here for the daemon."""

from orchestrator.core.health import (
    CheckResult,
    HealthEvent,
    HealthMachine,
    HealthState,
    HealthTable,
    HealthView,
    ServerHealth,
    Target,
    apply_health,
)
from orchestrator.health.checks import check_http, check_tcp, check_udp, run_check
from orchestrator.health.runner import HealthRunner, Probe, probes_of, targets_of

__all__ = [
    "CheckResult",
    "HealthEvent",
    "HealthMachine",
    "HealthRunner",
    "HealthState",
    "HealthTable",
    "HealthView",
    "Probe",
    "ServerHealth",
    "Target",
    "apply_health",
    "check_http",
    "check_tcp",
    "check_udp",
    "probes_of",
    "run_check",
    "targets_of",
]
