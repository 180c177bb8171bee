"""Property-based tests (issue 13, item 6): the analyser, the configuration loader and the netlink
decoders take anything without raising anything but their documented answer, and the encoder and
decoder invert each other on generated operations. Runs are bounded (PROPERTY) so the unit suite
stays fast; a failure prints the smallest example hypothesis found."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import HAO, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP

from orchestrator.analyze.keys import SessionKeyKind, session_key
from orchestrator.analyze.packet import REASONS, Malformed, Packet, analyze
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.examples import example
from orchestrator.config.load import ConfigError, parse_config
from orchestrator.config.model import BalancerConfig
from orchestrator.config.server_model import ServerConfig
from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import constants as c
from orchestrator.dataplane.netlink import decode, encode, layouts, nla
from tests.unit.conftest import BALANCER_EXAMPLE, SERVER_EXAMPLE

# No example database: a run leaves no files behind, and each run explores afresh.
PROPERTY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DEVS = {"lo": 1, "lan0": 2, "fab0": 3, "eth0": 4}


def ifname(index: int) -> str:
    """Every index has a name: the decoders' own errors are under test, not the callback's."""
    return {v: k for k, v in DEVS.items()}.get(index, f"if{index}")


# -- the analyser ----------------------------------------------------------------------------------------

VALID = [
    bytes(IP(src="10.0.1.10", dst="10.0.0.100") / TCP(sport=40000, dport=80, flags="S")),
    bytes(IP(src="10.0.1.10", dst="10.0.0.100", options=b"\x01\x01\x01\x00") / UDP(sport=5000, dport=53) / b"q"),
    bytes(IPv6(src="2001:db8::10", dst="fd00:100::100") / TCP(sport=40000, dport=443, flags="S")),
    bytes(
        IPv6(src="2001:db8:1::7", dst="fd00:100::100")
        / IPv6ExtHdrDestOpt(options=[HAO(hoa="2001:db8::77")])
        / UDP(sport=5000, dport=53)
    ),
    bytes(IP(src="10.0.1.10", dst="10.0.0.100") / ESP(spi=0x1234, seq=1) / (b"x" * 16)),
    bytes(
        IP(src="10.0.9.1", dst="10.0.1.10")
        / ICMP(type=3, code=4)
        / IP(src="10.0.1.10", dst="10.0.0.100")
        / TCP(sport=40000, dport=80)
    ),
]


def check_analysis(result: Packet | Malformed) -> None:
    """The analyser's contract: a Packet, or a Malformed whose reason is one of REASONS (never
    `internal`, the name of a bug it caught)."""
    assert isinstance(result, (Packet, Malformed))
    if isinstance(result, Malformed):
        assert result.reason in REASONS and result.reason != "internal", result
    else:
        for kind in SessionKeyKind:
            session_key(result, kind)  # every analysed packet has a key of every kind


@PROPERTY
@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, partial: bool) -> None:
    check_analysis(analyze(data, partial=partial))


@PROPERTY
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=6),
    st.one_of(st.none(), st.integers(0, 200)),
    st.booleans(),
)
def test_mutated_valid_packets_never_raise(
    base: bytes, flips: list[tuple[int, int]], cut: int | None, partial: bool
) -> None:
    data = bytearray(base)
    for index, value in flips:
        if index < len(data):
            data[index] = value
    check_analysis(analyze(bytes(data[:cut] if cut is not None else data), partial=partial))


@PROPERTY
@given(st.sampled_from(VALID), st.data())
def test_a_cut_fixed_header_is_classified_by_its_reason(base: bytes, data: st.DataObject) -> None:
    header = 20 if base[0] >> 4 == 4 else 40
    cut = data.draw(st.integers(1, header - 1))
    result = analyze(base[:cut])
    assert isinstance(result, Malformed)
    assert result.reason == ("truncated-ipv4-header" if header == 20 else "truncated-ipv6-header")


@PROPERTY
@given(st.sampled_from(VALID), st.integers(0, 15).filter(lambda v: v not in (4, 6)))
def test_another_ip_version_is_classified(base: bytes, version: int) -> None:
    result = analyze(bytes([version << 4 | base[0] & 0xF]) + base[1:])
    assert isinstance(result, Malformed) and result.reason == "bad-ip-version"


# -- the configuration loader ----------------------------------------------------------------------------

EXAMPLES = {"balancer": BALANCER_EXAMPLE.read_text(), "server": SERVER_EXAMPLE.read_text()}
SOURCE = "prop.yaml"


def check_loaded(text: str, need_line: bool = False) -> None:
    """A configuration, or a ConfigError reading "FILE[:LINE]: [KEY.PATH: ]message"; nothing else."""
    try:
        cfg = parse_config(text, SOURCE)
    except ConfigError as exc:
        assert str(exc).startswith(f"{SOURCE}:") and exc.message
        if need_line:
            assert exc.line is not None, str(exc)
        return
    assert isinstance(cfg, (BalancerConfig, ServerConfig, ClientConfig))
    # `config show --json` (written as it writes it) is read back as the same configuration
    assert parse_config(json.dumps(cfg.to_dict(), ensure_ascii=False), SOURCE) == cfg


@PROPERTY
@given(st.text(max_size=300))
def test_arbitrary_text_is_a_config_or_a_config_error(text: str) -> None:
    check_loaded(text)


YAMLISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(
    st.sampled_from(["balancer", "server", "other", None]),
    st.dictionaries(
        st.sampled_from(
            [
                "node",
                "interfaces",
                "labels",
                "pools",
                "services",
                "vips",
                "balancer",
                "nfqueue",
                "metrics",
                "sessions",
                "x",
            ]
        ),
        YAMLISH,
        max_size=6,
    ),
)
def test_yaml_documents_of_any_shape_are_a_config_or_a_config_error(role: str | None, body: dict[str, object]) -> None:
    document = {**({"role": role} if role else {}), **body}
    check_loaded(yaml.safe_dump(document, allow_unicode=True))


@PROPERTY
@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.lists(
        st.tuples(
            st.sampled_from(["drop", "dup", "swap", "value", "indent"]), st.integers(0, 400), st.text(max_size=10)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_example_configs_are_a_config_or_an_error_with_its_line(
    role: str, edits: list[tuple[str, int, str]]
) -> None:
    lines = [line for line in EXAMPLES[role].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for kind, at, text in edits:
        i = at % len(lines)
        if kind == "drop" and len(lines) > 2:
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = (i + 1) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {text!r}" if text else f"{key}:"
        elif kind == "indent":
            lines[i] = "  " + lines[i]
    text = "\n".join(lines) + "\n"
    # A document that is still a mapping with its role line says where it is wrong.
    check_loaded(text, need_line=text.startswith("role:") and "\nrole:" not in text)


# -- the netlink decoders --------------------------------------------------------------------------------

ATTR = st.tuples(st.integers(0, 40), st.binary(max_size=24))


def attrs(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(nla.attr(kind, payload) for kind, payload in items)


def nested(kinds: list[int]) -> st.SearchStrategy[bytes]:
    """Attribute streams of these types whose payloads are themselves arbitrary or attributes."""
    leaf = st.binary(max_size=24)
    inner = st.lists(st.tuples(st.sampled_from(kinds), leaf), max_size=5).map(attrs)
    return st.lists(st.tuples(st.sampled_from(kinds), leaf | inner), max_size=8).map(attrs)


def decoded(call: object) -> None:
    """Anything a decoder returns is fine; what it raises must be DecodeError."""
    try:
        call()  # type: ignore[operator]
    except decode.DecodeError:
        pass


@PROPERTY
@given(st.binary(max_size=300))
def test_the_attribute_walkers_take_any_bytes(data: bytes) -> None:
    for kind, _flags, _seq, body in nla.messages(data):
        assert isinstance(kind, int) and len(body) <= len(data)
    for kind, payload in nla.iter_attrs(data):
        assert 0 <= kind <= nla.NLA_TYPE_MASK and len(payload) <= len(data)
    nla.attrs(data)


RT_KINDS = [c.RTA_DST, c.RTA_OIF, c.RTA_VIA, c.RTA_NEWDST, c.RTA_ENCAP_TYPE, c.RTA_ENCAP, c.RTA_GATEWAY, c.RTA_TABLE]
RT_KINDS += [c.MPLS_IPTUNNEL_DST, c.FRA_SRC, c.FRA_TABLE, c.FRA_PRIORITY, c.FRA_PROTOCOL]


@PROPERTY
@given(
    st.sampled_from([28, 2, 10, 0]),
    st.integers(0, 255),
    st.sampled_from([c.RT_PROTO, 0]),
    st.integers(0, 255),
    st.sampled_from([c.RTN_UNICAST, 0, 2]),
    nested(RT_KINDS),
    st.binary(max_size=12),
)
def test_route_and_rule_decoders_raise_only_decode_error(
    family: int, dst_len: int, proto: int, table: int, rtype: int, body: bytes, junk: bytes
) -> None:
    header = nla.RTMSG.pack(family, dst_len, 0, 0, table, proto, 0, rtype, 0)
    for raw in (header + body, header[: len(junk) % 12], junk):
        view = memoryview(raw)
        decoded(lambda v=view: decode.route(v, ifname))
        decoded(lambda v=view: decode.rule(v))
        decoded(lambda v=view: decode.next_hop(v, ifname))
        decoded(lambda v=view: decode.labels_of(v))


FLOWER_KINDS = [c.TCA_FLOWER_FLAGS, c.TCA_FLOWER_ACT, c.TCA_FLOWER_KEY_ETH_TYPE, c.TCA_FLOWER_KEY_IP_PROTO]
FLOWER_KINDS += [c.TCA_FLOWER_KEY_MPLS_LABEL, c.TCA_FLOWER_IN_HW_COUNT, c.TCA_U32_SEL, c.TCA_U32_ACT]
FLOWER_KINDS += [c.TCA_ACT_KIND, c.TCA_ACT_OPTIONS, c.TCA_ACT_COOKIE, c.TCA_MPLS_PARMS, c.TCA_MPLS_LABEL]
FLOWER_KINDS += list(range(1, 12))


@PROPERTY
@given(
    st.sampled_from([b"flower", b"u32", b"clsact", b""]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    nested(FLOWER_KINDS),
    st.binary(max_size=12),
)
def test_tc_decoders_raise_only_decode_error(kind: bytes, handle: int, info: int, options: bytes, junk: bytes) -> None:
    header = nla.TCMSG.pack(0, 0, 0, 3, handle, 0xFFFFFFF3, info)
    body = header + nla.attr(c.TCA_KIND, kind + b"\0") + nla.attr(c.TCA_OPTIONS, options)
    for raw in (body, body[: len(junk) + 4], junk):
        view = memoryview(raw)
        decoded(lambda v=view: decode.tc_filter(v, ifname))
        decoded(lambda v=view: decode.flower(v, ifname, require_cookie=False))
        decoded(lambda v=view: decode.u32(v, ifname, require_cookie=False))
        decoded(lambda v=view: decode.tc_header(v))
        decoded(lambda v=view: decode.qdisc_kind(v))


@PROPERTY
@given(st.sampled_from([*decode.FAST_PATH_SETS, "other"]), st.lists(st.binary(max_size=40), max_size=5))
def test_set_element_decoder_raises_only_decode_error(name: str, keys: list[bytes]) -> None:
    elements = b"".join(nla.attr(1, nla.attr(c.NFTA_SET_ELEM_KEY, nla.attr(c.NFTA_DATA_VALUE, key))) for key in keys)
    body = nla.NFGENMSG.pack(0, 0, 0) + nla.attr(c.NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
    body += nla.attr(c.NFTA_SET_ELEM_LIST_ELEMENTS, elements)
    decoded(lambda: decode.set_elements(memoryview(body)))


# -- encode -> decode ------------------------------------------------------------------------------------

LABEL = st.integers(16, ops.MPLS_LABEL_MAX)
V4 = st.integers(1, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
V6 = st.integers(1, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


def prefix(version: int) -> st.SearchStrategy[str]:
    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return st.tuples(st.integers(0, 2**bits - 1), st.integers(1, bits)).map(
        lambda t: str(make((t[0] >> (bits - t[1]) << (bits - t[1]), t[1])))
    )


DEV = st.sampled_from(sorted(DEVS))


@st.composite
def mpls_routes(draw: st.DrawFn) -> ops.MplsRoute:
    via = draw(st.none() | V4 | V6)
    return ops.MplsRoute(draw(LABEL), draw(DEV), via, tuple(draw(st.lists(LABEL, max_size=4))) if via else ())


@st.composite
def encap_routes(draw: st.DrawFn) -> ops.EncapRoute:
    version = draw(st.sampled_from([4, 6]))
    via = draw(st.none() | (V4 if version == 4 else V6))
    return ops.EncapRoute(
        draw(prefix(version)),
        tuple(draw(st.lists(LABEL, min_size=1, max_size=4))),
        draw(DEV),
        via,
        draw(st.integers(1, 2**32 - 1)),
    )


@st.composite
def rules(draw: st.DrawFn) -> ops.Rule:
    version = draw(st.sampled_from([4, 6]))
    return ops.Rule(draw(prefix(version)), draw(st.integers(1, 2**32 - 1)), draw(st.integers(1, 2**32 - 1)))


@st.composite
def flower_filters(draw: st.DrawFn) -> ops.FlowerFilter:
    if draw(st.booleans()):
        match = ops.FlowerMatch(mpls_label=draw(LABEL))
        actions: tuple[ops.Action, ...] = (ops.SetMark(draw(st.integers(0, 2**32 - 1))),)
    else:
        version = draw(st.sampled_from([4, 6]))
        proto = draw(st.sampled_from([None, "tcp", "udp", "sctp", "esp"]))
        ports = proto in ("tcp", "udp", "sctp")
        match = ops.FlowerMatch(
            src=draw(st.none() | prefix(version)),
            dst=draw(prefix(version)),
            ip_proto=proto,
            src_port=draw(st.none() | st.integers(0, 65535)) if ports else None,
            dst_port=draw(st.none() | st.integers(0, 65535)) if ports else None,
        )
        stack = draw(st.lists(st.tuples(LABEL, st.integers(1, 255)), min_size=1, max_size=3))
        actions = tuple(ops.MplsPush(label, ttl) for label, ttl in stack)
        if draw(st.booleans()):
            actions += (ops.MplsPop(draw(st.sampled_from(["ip", "ipv6", "mpls_uc"]))),)
    tag = draw(st.binary(max_size=ops.tag_capacity(len(actions))))
    return ops.FlowerFilter(
        draw(DEV),
        draw(st.integers(1, 2**32 - 1)),
        match,
        actions,
        draw(st.sampled_from(list(ops.Direction))),
        draw(st.integers(1, 65535)),
        draw(st.sampled_from(list(ops.OffloadPolicy))),
        tag,
    )


@PROPERTY
@given(st.one_of(mpls_routes(), encap_routes(), rules(), flower_filters()))
def test_decode_inverts_encode_for_generated_operations(obj: ops.DataplaneObject) -> None:
    _, _, body = encode.encode(ops.Add(obj), DEVS.__getitem__)
    view = memoryview(body)
    if isinstance(obj, ops.FlowerFilter):
        installed = decode.tc_filter(view, ifname)
    elif isinstance(obj, ops.Rule):
        installed = decode.rule(view)
    else:
        installed = decode.route(view, ifname)
    assert installed is not None and installed.obj == obj


@PROPERTY
@given(flower_filters(), st.integers(0, 400))
def test_a_cut_encoded_filter_decodes_or_raises_decode_error(obj: ops.FlowerFilter, cut: int) -> None:
    _, _, body = encode.encode(ops.Add(obj), DEVS.__getitem__)
    decoded(lambda: decode.tc_filter(memoryview(body[: cut % (len(body) + 1)]), ifname))


def test_config_show_json_of_text_beyond_the_bmp_reads_back_as_the_same_config(tmp_path: Path) -> None:
    """Found by the mutated-examples property: JSON's default escapes a non-BMP character as a
    surrogate pair, which a YAML reader keeps as two characters."""
    from typer.testing import CliRunner

    from orchestrator.cli.main import app

    path = tmp_path / "lb.yaml"
    path.write_text(example("balancer", {"node.control_socket": "/run/\U0001d400.sock"}), encoding="utf-8")
    shown = CliRunner().invoke(app, ["config", "show", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    assert parse_config(shown.output, SOURCE) == parse_config(path.read_text(encoding="utf-8"), SOURCE)


# -- the layout decoder of dumps (dataplane/netlink/layouts.py) ----------------------------------------

CAPTURED = [
    bytes.fromhex(h)
    for h in json.loads((Path(__file__).parent / "data" / "restart_filters.json").read_text())["filters"]
]


@PROPERTY
@given(st.lists(flower_filters(), min_size=1, max_size=6))
def test_the_layout_decoder_equals_decode_flower_on_generated_filters(objs: list[ops.FlowerFilter]) -> None:
    flower = layouts.FlowerDecoder()
    bodies = [encode.encode(ops.Add(obj), DEVS.__getitem__)[2] for obj in objs]
    for body in bodies + bodies:  # the second pass through the layouts the first learnt
        got, want = flower(memoryview(body), ifname), decode.flower(memoryview(body), ifname)
        assert got == want and (got is None or got.packets == want.packets)  # type: ignore[union-attr]


@PROPERTY
@given(st.sampled_from(CAPTURED[1:]), st.lists(st.tuples(st.integers(0, 575), st.integers(0, 255)), max_size=4))
def test_the_layout_decoder_equals_decode_flower_on_mutated_captured_filters(
    body: bytes, changes: list[tuple[int, int]]
) -> None:
    flower = layouts.FlowerDecoder()
    flower(memoryview(CAPTURED[1]), ifname)  # its layout learnt
    mutated = bytearray(body)
    for at, value in changes:
        mutated[at % len(mutated)] = value
    view = memoryview(bytes(mutated))
    try:
        want = decode.flower(view, ifname)
    except decode.DecodeError:
        want = None
        raised = True
    else:
        raised = False
    try:
        got = flower(view, ifname)
    except decode.DecodeError:
        assert raised
        return
    assert not raised and got == want and (got is None or got.packets == want.packets)  # type: ignore[union-attr]
