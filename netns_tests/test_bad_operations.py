"""Operations the kernel refuses give errors that name the operation; the rest of the batch is
applied all the same, and nothing is left half done."""

from __future__ import annotations

import errno

from netns_tests.harness.reference import balancer_node, fabric_node
from orchestrator.dataplane import ops
from orchestrator.lab.kit import Lab


def test_each_bad_operation_is_reported_and_the_good_ones_land(lab: Lab) -> None:
    lb = balancer_node(lab)
    fab = lab.iface(lb, towards=fabric_node(lab))["dev"]
    peer = lab.peer_address(lb, fabric_node(lab))
    good = ops.MplsRoute(5001, fab, via=peer, out_labels=(101, 5001))
    deepest = ops.EncapRoute("192.0.2.30/32", tuple(range(200, 230)), fab, via=peer, table=4242)
    too_deep = ops.EncapRoute("192.0.2.31/32", tuple(range(200, 231)), fab, via=peer, table=4242)
    batch = [
        ops.Add(ops.MplsRoute(3, fab, via=peer)),  # reserved (implicit null)
        ops.Add(ops.MplsRoute(1 << 20, fab, via=peer)),  # not a label at all
        ops.Add(ops.MplsRoute(5003, "nosuch0", via=peer)),  # unknown device
        ops.Add(good),
        ops.Add(good),  # duplicate
        ops.Add(deepest),  # 30 labels: the kernel's limit
        ops.Add(too_deep),  # 31 labels
    ]
    results = lab.provider(lb).apply(batch)
    assert [r.op for r in results] == batch
    by_index = dict(enumerate(results))
    assert [i for i, r in by_index.items() if r.ok] == [3, 5], [str(r) for r in results]

    assert by_index[0].errno == errno.EINVAL and "mpls route 3 " in str(by_index[0])
    assert "Implicit NULL" in by_index[0].error  # the kernel's own words
    assert "not an MPLS label" in by_index[1].error and "1048576" in str(by_index[1])
    assert by_index[2].errno == errno.ENODEV and "nosuch0" in by_index[2].error
    assert by_index[4].errno == errno.EEXIST and "mpls route 5001" in str(by_index[4])
    assert by_index[6].errno == errno.EINVAL and "192.0.2.31/32" in str(by_index[6])

    installed = {i.obj for i in lab.provider(lb).dump()}
    assert good in installed and deepest in installed and too_deep not in installed
    cleanup = lab.provider(lb).apply([ops.Delete(good), ops.Delete(deepest)])
    assert all(r.ok for r in cleanup)
    assert not {good, deepest} & {i.obj for i in lab.provider(lb).dump()}


def test_delete_of_something_absent_is_an_error_that_names_it(lab: Lab) -> None:
    lb = balancer_node(lab)
    lab.sh(lb, "ip", "link", "add", "absent0", "type", "dummy")
    try:
        missing = ops.FlowerFilter("absent0", 77777, ops.FlowerMatch(src="192.0.2.77/32"), ops.push_stack((5,)))
        missing_route = ops.EncapRoute("192.0.2.78/32", (5,), "absent0", table=4243)
        results = lab.provider(lb).apply(
            [
                ops.Add(ops.ClsactQdisc("absent0")),
                ops.Delete(missing),
                ops.Delete(missing_route),
                ops.Add(ops.ClsactQdisc("absent0")),
            ]
        )
        assert results[0].ok
        assert results[1].errno == errno.ENOENT and "handle 77777" in str(results[1])
        assert results[2].errno == errno.ESRCH and "192.0.2.78/32" in str(results[2])
        assert results[3].errno == errno.EEXIST and "qdisc clsact dev absent0" in str(results[3])
    finally:
        lab.sh(lb, "ip", "link", "del", "absent0", check=False)


def test_objects_of_other_owners_are_neither_dumped_nor_touched(lab: Lab) -> None:
    lb = balancer_node(lab)
    fab = lab.iface(lb, towards=fabric_node(lab))["dev"]
    peer = lab.peer_address(lb, fabric_node(lab))
    lab.sh(lb, "ip", "-f", "mpls", "route", "add", "6001", "via", "inet", peer, "dev", fab)
    lab.sh(
        lb, "ip", "route", "add", "192.0.2.60/32", "encap", "mpls", "100/6001", "via", peer, "dev", fab, "table", "4244"
    )
    try:
        dumped = lab.provider(lb).dump()
        assert not any(isinstance(i.obj, ops.MplsRoute) and i.obj.label == 6001 for i in dumped)
        assert not any(isinstance(i.obj, ops.EncapRoute) and i.obj.table == 4244 for i in dumped)
        # Our delete carries our protocol: the kernel refuses to remove someone else's route.
        result = lab.provider(lb).apply([ops.Delete(ops.EncapRoute("192.0.2.60/32", (100, 6001), fab, table=4244))])[0]
        assert result.errno == errno.ESRCH
        assert "192.0.2.60" in lab.sh(lb, "ip", "route", "show", "table", "4244").stdout
    finally:
        lab.sh(lb, "ip", "-f", "mpls", "route", "del", "6001", check=False)
        lab.sh(lb, "ip", "route", "del", "192.0.2.60/32", "table", "4244", check=False)
