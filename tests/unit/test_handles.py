"""The C2S filter handle layout: its bounds raise instead of wrapping onto another filter."""

from __future__ import annotations

import pytest

from orchestrator.dataplane.handles import (
    FILTERS_PER_SESSION,
    U32_NODES,
    HandleOverflow,
    filter_handle,
    handle_c2s,
    handle_index,
    relabel_handle,
    u32_handle,
    u32_node,
)
from orchestrator.dataplane.ops import MPLS_LABEL_MAX


@pytest.mark.parametrize("c2s,index", [(1001, 0), (1001, FILTERS_PER_SESSION - 1), (MPLS_LABEL_MAX, 7), (1, 0)])
def test_a_handle_gives_back_its_label_and_index(c2s: int, index: int) -> None:
    handle = filter_handle(c2s, index)
    assert (handle_c2s(handle), handle_index(handle)) == (c2s, index)
    assert 0 < handle < 1 << 32


@pytest.mark.parametrize(
    "c2s,index,fragment",
    [
        (1001, FILTERS_PER_SESSION, "filter index 256"),
        (1001, -1, "filter index -1"),
        (0, 0, "C2S label 0"),
        (MPLS_LABEL_MAX + 1, 0, "C2S label 1048576"),
    ],
)
def test_out_of_bounds_raises_instead_of_wrapping(c2s: int, index: int, fragment: str) -> None:
    with pytest.raises(HandleOverflow, match=fragment):
        filter_handle(c2s, index)


def test_a_relabelled_handle_keeps_its_index() -> None:
    assert relabel_handle(filter_handle(1001, 3), 2003) == filter_handle(2003, 3)
    with pytest.raises(HandleOverflow):
        relabel_handle(filter_handle(1001, 3), MPLS_LABEL_MAX + 1)


def test_u32_nodes_are_nodes_of_the_root_hash_table() -> None:
    assert u32_handle(1) == 0x80000001 and u32_node(u32_handle(U32_NODES)) == U32_NODES
    for bad in (0, U32_NODES + 1):
        with pytest.raises(HandleOverflow, match="is no node of a hash table"):
            u32_handle(bad)
