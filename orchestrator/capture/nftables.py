"""The nftables rulesets of both roles (table `inet mplsorch`): rendered from templates/ with
jinja2, loaded with `nft -f`.

The ruleset is per node, loaded at start and on reload, never per session: `nft` checks the whole
ruleset atomically for us. What changes per session, the elements of the fast-path sets, goes
over netlink as dataplane operations (dataplane.ops.FastPathElement), never through `nft`."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import jinja2

from orchestrator.analyze.keys import SessionKeyKind
from orchestrator.capture.conntrack import CT_MASK, CT_TAG
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.model import BalancerConfig, FailPolicy
from orchestrator.config.server_model import ServerConfig
from orchestrator.core.agent import MARK_MASK, MARK_TAG
from orchestrator.dataplane.netlink import decode, encode
from orchestrator.dataplane.netlink.constants import NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWTABLE
from orchestrator.dataplane.netlink.nlsocket import DumpInterrupted, NftBatchSocket

# In the package (package data), so an installed daemon has them; templates/ at the top of the
# repository is a link to the same folder.
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
MARK_RST = 0x6D6F0001  # "mo" + 1: reject with TCP reset
MARK_ICMP = 0x6D6F0002  # reject with ICMP administratively prohibited
HASH_SEED = 0x6D706C73  # "mpls": the workers' jhash seed (queue_statement)
CT_MARKS = {"ct_tag": f"{CT_TAG:#010x}", "ct_keep": f"{~CT_MASK & 0xFFFFFFFF:#010x}"}  # tag our flows


def render(config: BalancerConfig, template_dir: Path = TEMPLATES) -> str:
    services = []
    for svc in config.services:
        version = svc.vip.version
        proto = str(svc.protocol.value)
        if svc.ports:
            ports = ", ".join(str(p) for p in svc.ports)
            l4 = f"{proto} dport {{ {ports} }}"
        else:
            l4 = f"meta l4proto {proto}"
        family = "ip6" if version == 6 else "ip"
        fast = fast_path_match(svc.session_key, family, proto, bool(svc.ports))
        by_spi = svc.session_key == SessionKeyKind.ESP_SPI and proto == "esp"
        services.append(
            {
                "name": svc.name,
                "vip": str(svc.vip),
                "version": version,
                "family": family,
                "l4": l4,
                "queue": queue_statement(config, svc.session_key, family, svc.fail_policy),
                "fast": fast,
                "new": new_packet_match(by_spi, family, str(svc.vip), l4),
                "exthdr": by_spi and family == "ip6",
            }
        )
    rate, total = config.nfqueue.rate_limit, config.nfqueue.global_rate_limit
    return _template(template_dir, "nftables.balancer.nft.j2").render(
        services=services,
        rate_limit={"count": rate.count, "per": str(rate.per.value), "burst": rate.burst} if rate else None,
        global_rate_limit={"count": total.count, "per": str(total.per.value), "burst": total.burst} if total else None,
        mark_rst=hex(MARK_RST),
        mark_icmp=hex(MARK_ICMP),
        **CT_MARKS,
    )


def queue_statement(config: BalancerConfig, key: SessionKeyKind, family: str, fail: FailPolicy) -> str:
    """A service's queue statement, after `queue`. One daemon: the queue range, fanned out over
    it. Workers (nfqueue.workers): the queue of the client's worker, by a hash of its source
    address (of its interface identifier for ipv6-iid, whose sessions keep a client that changes
    prefix), so a client's first packets always reach the same worker; fanout would break that.
    One seed for every rule and every load: without it the kernel draws one per rule (a client's
    sessions of two services would reach different workers) and per load (a restart would move
    clients away from the worker that holds their sessions)."""
    first, last = config.nfqueue.queues
    bypass = fail == FailPolicy.OPEN
    if config.nfqueue.workers > 1:
        source = "@nh,128,64" if key == SessionKeyKind.IPV6_IID and family == "ip6" else f"{family} saddr"
        target = f"jhash {source} mod {config.nfqueue.workers} seed {HASH_SEED:#x} offset {first}"
        return f"flags bypass to {target}" if bypass else f"to {target}"
    queues = f"{first}-{last}" if last > first else str(first)
    return f"flags {'bypass,fanout' if bypass else 'fanout'} to {queues}"


def fast_path_match(kind: SessionKeyKind, family: str, proto: str, ports: bool) -> str | None:
    """The set lookup of a service's fast-path rule (dataplane.ops.FastPathElement names the
    sets), None for five-tuple: there every flow is a session of its own, so no new flow ever
    belongs to an existing one. Every key keeps the client address: a session's new address
    (a mobile node's care-of address, a new prefix with a known IPv6 IID, an SPI from elsewhere)
    needs its own C2S filter, which only the daemon can add."""
    if kind == SessionKeyKind.FIVE_TUPLE:
        return None
    head = f"{family} saddr . {family} daddr"
    version = 6 if family == "ip6" else 4
    if kind == SessionKeyKind.ESP_SPI and proto == "esp":
        return f"{head} . esp spi @fastesp{version}"
    return f"{head} . meta l4proto . th dport @fast{version}" if ports else f"{head} . meta l4proto @fastproto{version}"


def new_packet_match(by_spi: bool, family: str, vip: str, l4: str) -> str:
    """What makes a packet to a service a session's first: a new flow (`ct state new`), except
    for ESP told apart by SPI, where conntrack keeps one entry per address pair (generic
    protocol) and a client's second SPI is an established flow to it. There any packet whose
    (source, VIP, SPI) is not in the fast-path set is a first packet, whatever its ct state;
    the packets of known SPIs never match, so they never reach userspace."""
    head = f"{family} daddr {vip} {l4}"
    if by_spi:
        version = 6 if family == "ip6" else 4
        return f"{head} {family} saddr . {family} daddr . esp spi != @fastesp{version}"
    return f"ct state new {head}"


def render_server(config: ServerConfig, template_dir: Path = TEMPLATES) -> str:
    """The server agent's ruleset: queue the first packet of each new flow that came to a VIP
    under one of our session labels (its mark says so), count the labelled ones that stay in the
    kernel."""
    families = [
        (family, [str(v.address) for v in config.vips if v.address.version == version])
        for family, version in (("ip", 4), ("ip6", 6))
    ]
    return _template(template_dir, "nftables.server.nft.j2").render(
        families=[(family, vips) for family, vips in families if vips],
        queue=config.nfqueue.queue,
        mark_mask=f"{MARK_MASK:#010x}",
        mark_tag=f"{MARK_TAG:#010x}",
        **CT_MARKS,
    )


def render_client(config: ClientConfig, template_dir: Path = TEMPLATES) -> str:
    """The client agent's ruleset: queue the first labelled answer from a VIP of each flow not
    yet tagged, count the labelled ones that stay in the kernel."""
    families = [
        (family, [str(v) for v in config.vips if v.version == version]) for family, version in (("ip", 4), ("ip6", 6))
    ]
    return _template(template_dir, "nftables.client.nft.j2").render(
        families=[(family, vips) for family, vips in families if vips],
        queue=config.nfqueue.queue,
        mark_mask=f"{MARK_MASK:#010x}",
        mark_tag=f"{MARK_TAG:#010x}",
        ct_mask=f"{CT_MASK:#010x}",
        **CT_MARKS,
    )


def _template(template_dir: Path, name: str) -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template(name)


# Every ruleset loaded carries its own digest in its table's comment, so a restarting daemon can
# tell whether the kernel already holds the very ruleset it would load: then it loads nothing, and
# the fast-path sets keep their elements (loading would empty them: every session's elements
# added again, and new flows of existing sessions queued until they are).
DIGEST_COMMENT = "mplsorch ruleset sha256:"
TABLE_OPENS = "table inet mplsorch {"


def digest(ruleset: str) -> str:
    return hashlib.sha256(ruleset.encode()).hexdigest()


def with_digest(ruleset: str) -> str:
    """The ruleset with its digest as its table's comment (the first line that opens the table
    gets it; a ruleset without one is left as it is)."""
    lines = ruleset.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip() == TABLE_OPENS:
            lines.insert(i + 1, f'\tcomment "{DIGEST_COMMENT}{digest(ruleset)}"\n')
            break
    return "".join(lines)


def loaded(ruleset: str) -> bool:
    """Whether the kernel's table inet mplsorch is this ruleset as `load` loaded it (its comment
    names the ruleset's digest). One NFT_MSG_GETTABLE, no listing: `nft list` reads every set
    element (seconds at 100,000). False when there is no such table or it cannot be read."""
    try:
        with NftBatchSocket() as sock:
            [answer] = sock.query([encode.table_get()])
    except OSError:
        return False
    if not isinstance(answer, tuple) or answer[0] != NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE:
        return False
    try:
        comment = decode.table_comment(answer[1])
    except decode.DecodeError:
        return False
    return comment == f"{DIGEST_COMMENT}{digest(ruleset)}"


class NftError(RuntimeError):
    """`nft` refused the ruleset or could not run: the message is one line, nft's own first."""


def load(ruleset: str) -> None:
    """Replace our table atomically; raise NftError with nft's own message on failure (an
    unchanged table: nft applies all of the file or none of it). The table carries the
    ruleset's digest (`with_digest`, `loaded`)."""
    try:
        result = subprocess.run(["nft", "-f", "-"], input=with_digest(ruleset), capture_output=True, text=True)
    except OSError as exc:
        raise NftError(f"cannot run nft: {exc.strerror or exc}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        first = lines[0] if lines else f"exit status {result.returncode}"
        raise NftError(f"nft refused the ruleset: {first}")


def read_counters(sock: NftBatchSocket | None = None) -> dict[str, int]:
    """Our named counters' packet counts (for `status`): one NFT_MSG_GETOBJ dump of the counter
    objects of our table over nf_tables netlink, which costs the same at any number of sessions
    (`nft list counters` filled its cache with every set element first: 93 s at 500,000).
    Empty when they cannot be read (no table yet, no nf_tables). `sock`: a socket to use (and
    close) instead of a new one in this process's namespace."""
    kind, body = encode.counters_dump()
    try:
        with sock if sock is not None else NftBatchSocket() as nft:
            replies = nft.dump(kind, body)
    except (OSError, DumpInterrupted):
        return {}
    out: dict[str, int] = {}
    for _kind, mbody in replies:
        named = decode.counter(mbody)
        if named is not None:
            out[named[0]] = named[1]
    return out


def remove() -> None:
    subprocess.run(["nft", "delete", "table", "inet", "mplsorch"], capture_output=True)
