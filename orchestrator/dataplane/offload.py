"""What the kernel says of our objects' hardware offload, in the words `mplsorch routes`,
`status` and the metrics use: one place, so the three never disagree (docs/offload.md).

Only tc filters and routes carry an offload state in the kernel's dumps (TCA_CLS_FLAGS_* and
RTM_F_* / RTNH_F_*); rules and qdiscs have none and are listed by `routes` but never counted."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

from orchestrator.dataplane import ops

# Where the kernel reports an offload state: filters, label routes, encap routes (plain or to a
# nexthop object).
REPORTING = (ops.FlowerFilter, ops.MplsRoute, ops.EncapRoute, ops.NexthopRoute)
# What a skip_sw filter the hardware refuses comes back with: EOPNOTSUPP from tc_setup_cb_add()
# when a device of the block cannot offload, EINVAL from cls_flower when none took it.
REFUSED_ERRNOS = (errno.EOPNOTSUPP, errno.EINVAL)
# How both providers begin that error (an EINVAL of an operation no kernel could take does not).
REFUSED_PREFIX = "offload required"


def row(item: ops.Installed) -> dict[str, Any]:
    """One documented row of `mplsorch routes --json` (docs/json.md)."""
    obj, state = item.obj, item.offload
    reports = isinstance(obj, REPORTING)
    return {
        "object": obj.describe(),
        "kind": type(obj).__name__,
        "dev": getattr(obj, "dev", None),
        "policy": obj.offload.value if isinstance(obj, ops.FlowerFilter) else None,
        "offload": state.describe() if reports else None,
        **(
            {k: v for k, v in state.to_dict().items() if k != "state"}
            if reports
            else {"in_hw": None, "in_hw_count": None, "not_in_hw": None, "trap": None, "offload_failed": None}
        ),
    }


def counts(installed: Iterable[ops.Installed]) -> dict[str, int]:
    """Our filters and routes by offload state (every state present, 0 when none): what
    `status --json` shows as `offload` and the metrics as mplsorch_offload_objects{state}."""
    out = dict.fromkeys(ops.OFFLOAD_STATES, 0)
    for item in installed:
        if isinstance(item.obj, REPORTING):
            out[item.offload.state] += 1
    return out


def refused(result: ops.OpResult) -> bool:
    """A filter whose policy is `required` that the kernel would not put in hardware: the
    failure that `interfaces.offload: required` promises to make loud."""
    obj = result.op.obj
    return (
        not result.ok
        and isinstance(obj, ops.FlowerFilter)
        and obj.offload is ops.OffloadPolicy.REQUIRED
        and not isinstance(result.op, ops.Delete)
        and result.errno in REFUSED_ERRNOS
        and (result.error or "").startswith(REFUSED_PREFIX)
    )
