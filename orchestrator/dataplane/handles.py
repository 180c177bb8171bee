"""The handles of a session's C2S flower filters: `C2S label << 8 | index`. The handle names the
session (a restart rebuilds the table from the kernel's filters by it) and the index tells a
session's filters apart (one per port of the service, for every client address it has had).

The C2S filters of `esp-spi` sessions (both families) are cls_u32 nodes, whose handle is
`htid:hash:node` (12, 8 and 12 bits): ours are nodes 1..4095 of the root hash table 800: of
their pref, the device's only u32 classifier (a second one would get 801:), so a device holds
at most U32_NODES of them; their C2S label is the one they push.

Only this module writes or reads that layout. An index that does not fit in 8 bits raises instead
of wrapping onto another filter of the same session (the kernel would answer "object exists");
the configuration refuses services whose ports cannot all be encoded (config/load.py)."""

from __future__ import annotations

from orchestrator.dataplane.ops import MPLS_LABEL_MAX

__all__ = [
    "FILTERS_PER_SESSION",
    "HandleOverflow",
    "U32_NODES",
    "filter_handle",
    "handle_c2s",
    "handle_index",
    "relabel_handle",
    "u32_handle",
    "u32_node",
]

INDEX_BITS = 8
FILTERS_PER_SESSION = 1 << INDEX_BITS  # indexes 0..255 under one C2S label


class HandleOverflow(ValueError):
    """A label or index outside what a 32-bit filter handle of this layout can hold."""


def filter_handle(c2s: int, index: int) -> int:
    if not 0 <= index < FILTERS_PER_SESSION:
        raise HandleOverflow(
            f"filter index {index} of session {c2s}: at most {FILTERS_PER_SESSION} filters fit a session's handles"
        )
    if not 0 < c2s <= MPLS_LABEL_MAX:
        raise HandleOverflow(f"C2S label {c2s} is no MPLS label (1..{MPLS_LABEL_MAX})")
    return c2s << INDEX_BITS | index


def handle_c2s(handle: int) -> int:
    """The C2S label of the session a filter belongs to."""
    return handle >> INDEX_BITS


def handle_index(handle: int) -> int:
    return handle & (FILTERS_PER_SESSION - 1)


def relabel_handle(handle: int, c2s: int) -> int:
    """The same filter of the session under a new C2S label (a failover's move)."""
    return filter_handle(c2s, handle_index(handle))


U32_ROOT = 0x800  # the root hash table of the first u32 classifier of a device's egress
U32_NODES = 0xFFF  # node ids 1..4095 of one hash table


def u32_handle(node: int) -> int:
    """The handle of u32 node `node` of the root hash table (800:0:node)."""
    if not 0 < node <= U32_NODES:
        raise HandleOverflow(f"u32 node {node} is no node of a hash table (1..{U32_NODES})")
    return U32_ROOT << 20 | node


def u32_node(handle: int) -> int:
    return handle & U32_NODES
