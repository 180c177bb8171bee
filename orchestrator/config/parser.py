"""The YAML walker shared by every role's configuration: line-marked errors and typed scalars.

The YAML is composed (SafeLoader) into a node tree that keeps line marks and walked by hand, so
that every error says where it is: `ConfigError` reads "FILE:LINE: KEY.PATH: message". Both roles
use these helpers, so a server file fails the way a balancer file does.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.config.model import IPAddress, IPNetwork, MetricsConfig, Role

E = TypeVar("E", bound=Enum)

_TAG = "tag:yaml.org,2002:"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DEV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$")  # IFNAMSIZ - 1, no '/' or spaces
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """A configuration is unusable. str(): "FILE:LINE: KEY.PATH: message" (LINE and KEY.PATH are
    left out when unknown, e.g. for a file that cannot be read)."""

    def __init__(self, source: str, line: int | None, path: str | None, message: str) -> None:
        self.source, self.line, self.path, self.message = source, line, path, message
        parts = [source] + ([str(line)] if line is not None else [])
        text = ":".join(parts) + ": " + (f"{path}: " if path else "") + message
        super().__init__(text)


@dataclass
class YamlValue:
    """A YAML node at a key path; `line` is the line of the key that introduced it."""

    node: Node
    path: str
    line: int

    @property
    def vline(self) -> int:
        """Line of the value itself."""
        return self.node.start_mark.line + 1


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _TAG + "null":
        return "nothing (null)"
    return repr(node.value)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}  # key path -> line of its value, for semantic errors
        self.key_lines: dict[str, int] = {}  # key path -> line of its key
        self._constructor = yaml.constructor.SafeConstructor()

    # ---- errors ----
    def error(self, line: int | None, path: str | None, message: str) -> ConfigError:
        return ConfigError(self.source, line, path, message)

    def at(self, path: str, message: str) -> ConfigError:
        """An error on a value already parsed (semantic checks)."""
        return self.error(self.lines.get(path), path, message)

    def _seen(self, v: YamlValue) -> YamlValue:
        self.lines[v.path] = v.vline
        return v

    # ---- structure ----
    def mapping(
        self,
        v: YamlValue,
        allowed: Iterable[str] | None,
        required: Iterable[str] = (),
        elsewhere: Mapping[str, str] | None = None,
    ) -> dict[str, YamlValue]:
        """A mapping's entries by key; rejects duplicate keys, unknown keys (when `allowed` is given)
        and missing required keys. `elsewhere` explains unknown keys that are known in another
        place (the other role's top-level keys), where a spelling suggestion would mislead."""
        self._seen(v)
        if not isinstance(v.node, MappingNode):
            raise self.error(v.vline, v.path or "(document)", f"expected a mapping, got {_describe(v.node)}")
        allowed = list(allowed) if allowed is not None else None
        out: dict[str, YamlValue] = {}
        for knode, vnode in v.node.value:
            kline = knode.start_mark.line + 1
            if isinstance(knode, ScalarNode) and knode.tag == _TAG + "merge":
                raise self.error(kline, join_path(v.path, "<<"), "merge keys (<<) are not supported")
            if not isinstance(knode, ScalarNode) or knode.tag != _TAG + "str":
                hint = "; quote it to make it one" if isinstance(knode, ScalarNode) else ""
                raise self.error(
                    kline, v.path or "(document)", f"keys must be plain strings, got {_describe(knode)}{hint}"
                )
            key = knode.value
            path = join_path(v.path, key)
            if key in out:
                raise self.error(kline, path, f"duplicate key (first given at line {out[key].line})")
            if allowed is not None and key not in allowed:
                note = (elsewhere or {}).get(key)
                raise self.error(kline, path, "unknown key" + (f" ({note})" if note else did_you_mean(key, allowed)))
            out[key] = self._seen(YamlValue(vnode, path, kline))
            self.key_lines[path] = kline
        for key in required:
            if key not in out:
                raise self.error(v.line, join_path(v.path, key), "required key is missing")
        return out

    def sequence(self, v: YamlValue) -> list[YamlValue]:
        if not isinstance(v.node, SequenceNode):
            raise self.error(v.vline, v.path, f"expected a list, got {_describe(v.node)}")
        return [self._seen(YamlValue(n, f"{v.path}[{i}]", n.start_mark.line + 1)) for i, n in enumerate(v.node.value)]

    # ---- scalars ----
    def _scalar(self, v: YamlValue, want: str) -> Any:
        if not isinstance(v.node, ScalarNode):
            raise self.error(v.vline, v.path, f"expected {want}, got {_describe(v.node)}")
        return self._constructor.construct_object(v.node)

    def is_null(self, v: YamlValue) -> bool:
        return isinstance(v.node, ScalarNode) and v.node.tag == _TAG + "null"

    def integer(self, v: YamlValue, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
        value = self._scalar(v, "an integer")
        if v.node.tag != _TAG + "int":
            raise self.error(v.vline, v.path, f"expected an integer, got {_describe(v.node)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo}..{hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
            raise self.error(v.vline, v.path, f"{(what + ' ') if what else ''}{value} is out of range: must be {rng}")
        return value

    def group(self, v: YamlValue) -> str | None:
        """A group name of this host (null: none). Checked here so that a typo stops `config
        validate` and a reload, not the daemon's control socket at run time."""
        if self.is_null(v):
            return None
        name = self.string(v)
        try:
            grp.getgrnam(name)
        except KeyError:
            raise self.error(v.vline, v.path, f"no group {name!r} on this host") from None
        return name

    def string(self, v: YamlValue) -> str:
        self._scalar(v, "a string")
        if v.node.tag != _TAG + "str" or v.node.value == "":
            raise self.error(v.vline, v.path, f"expected a non-empty string, got {_describe(v.node)}")
        return v.node.value

    def name(self, key: str, path: str, line: int, what: str) -> str:
        if not _NAME_RE.match(key):
            raise self.error(
                line,
                path,
                f"invalid {what} name {key!r}: use letters, digits, '-' and '_' "
                "(at most 64, starting with a letter or digit)",
            )
        return key

    def address(self, v: YamlValue) -> IPAddress:
        self._scalar(v, "an IP address")
        return self.address_text(v.node.value, v.vline, v.path)

    def address_text(self, text: str, line: int | None, path: str) -> IPAddress:
        """A unicast address from text (also a mapping key, e.g. a server's VIP)."""
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise self.error(line, path, f"{text!r} is not an IP address") from None
        if addr.is_unspecified or addr.is_multicast:
            raise self.error(line, path, f"{text!r} is not a usable unicast address")
        return addr

    def prefix(self, v: YamlValue) -> IPNetwork:
        """An IP prefix "ADDRESS/LENGTH" (a bare address is a host prefix); host bits must be
        zero, so that a typo cannot silently widen or narrow what it covers."""
        self._scalar(v, "an IP prefix")
        text = str(v.node.value)
        try:
            return ipaddress.ip_network(text)
        except ValueError:
            pass
        try:
            wide = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.error(v.vline, v.path, f"{text!r} is not an IP prefix (ADDRESS/LENGTH)") from None
        raise self.error(v.vline, v.path, f"{text!r} has host bits set; did you mean {wide}?")

    def choice(self, v: YamlValue, enum: type[E], what: str) -> E:
        text = self.string(v)
        try:
            return enum(text)
        except ValueError:
            names = [e.value for e in enum]
            raise self.error(
                v.vline,
                v.path,
                f"unknown {what} {text!r}; expected one of {', '.join(names)}" + did_you_mean(text, names),
            ) from None

    def duration(self, v: YamlValue) -> float:
        """ "30s", "5m", "1h", "500ms" or a number of seconds; must be >= 0."""
        value = self._scalar(v, "a duration")
        tag = v.node.tag
        if tag in (_TAG + "int", _TAG + "float"):
            seconds = float(value)
        elif tag == _TAG + "str" and (m := _DURATION_RE.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.error(
                v.vline,
                v.path,
                f'{_describe(v.node)} is not a duration: write e.g. "30s", "5m", "1h", "500ms" or a number of seconds',
            )
        if not seconds >= 0 or seconds == float("inf"):  # also rejects NaN
            raise self.error(v.vline, v.path, f"{v.node.value} is out of range: must be >= 0")
        return seconds

    def int_pair(self, v: YamlValue, lo: int, hi: int, strict: bool, what: str) -> tuple[int, int]:
        """[first, last] with lo <= first (<|<=) last <= hi."""
        items = self.sequence(v)
        if len(items) != 2:
            raise self.error(v.vline, v.path, f"expected [first, last] (two integers), got {len(items)} items")
        first, last = (self.integer(i) for i in items)
        for n in (first, last):
            if not lo <= n <= hi:
                raise self.error(v.vline, v.path, f"{what} {n} is out of range: must be within {lo}..{hi}")
        if first > last or (strict and first == last):
            rel = "<" if strict else "<="
            raise self.error(v.vline, v.path, f"first {first} must be {rel} last {last}")
        return first, last

    def devices(self, v: YamlValue) -> tuple[str, ...]:
        """A non-empty list of distinct interface names."""
        items = self.sequence(v)
        if not items:
            raise self.error(v.vline, v.path, "must name at least one interface")
        out: list[str] = []
        for i in items:
            dev = self.string(i)
            if not _DEV_RE.match(dev):
                raise self.error(i.vline, i.path, f"{dev!r} is not a valid interface name")
            if dev in out:
                raise self.error(i.vline, i.path, f"interface {dev!r} is listed twice")
            out.append(dev)
        return tuple(out)

    # ---- the document ----
    def compose(self, text: str) -> YamlValue:
        """The document's root node; YAML syntax errors and an empty document are ConfigErrors."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            msg = " ".join(x for x in (e.context, e.problem) if x)
            raise self.error(line, "(yaml)", f"not valid YAML: {msg}") from None
        except yaml.YAMLError as e:
            raise self.error(None, "(yaml)", f"not valid YAML: {e}") from None
        if root is None:
            raise self.error(1, "(document)", "the configuration is empty")
        return YamlValue(root, "", root.start_mark.line + 1)

    def role(self, root: YamlValue) -> Role:
        """`role`, read before anything else: it decides which keys the rest of the file may have."""
        if not isinstance(root.node, MappingNode):
            raise self.error(root.vline, "(document)", f"expected a mapping, got {_describe(root.node)}")
        for knode, vnode in root.node.value:
            if isinstance(knode, ScalarNode) and knode.tag == _TAG + "str" and knode.value == "role":
                return self.choice(self._seen(YamlValue(vnode, "role", knode.start_mark.line + 1)), Role, "role")
        roles = " or ".join(r.value for r in Role)
        raise self.error(root.line, "role", f"required key is missing ({roles})")


_LISTEN_RES = (re.compile(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)\Z"), re.compile(r"^([0-9.]+):(\d+)\Z"))


def parse_metrics(p: Parser, v: YamlValue) -> MetricsConfig | None:
    """`metrics.listen: "IP:PORT"` (both roles) ("[IPv6]:PORT"); null: no endpoint. An address, never a host
    name: the daemon must not depend on DNS to start. 0.0.0.0 or [::] listen everywhere."""
    if p.is_null(v):
        return None
    m = p.mapping(v, ("listen",))
    if "listen" not in m:
        return MetricsConfig()
    lv = m["listen"]
    text = p.string(lv)
    match = _LISTEN_RES[0].match(text) or _LISTEN_RES[1].match(text)
    try:
        if not match:
            raise ValueError(text)
        host = str(ipaddress.ip_address(match.group(1)))
    except ValueError:
        raise p.error(
            lv.vline,
            lv.path,
            f'{text!r} is not an address to listen on: write "IP:PORT" or "[IPv6]:PORT", e.g. "127.0.0.1:9469"',
        ) from None
    port = int(match.group(2))
    if not 1 <= port <= 65535:
        raise p.error(lv.vline, lv.path, f"port {port} is out of range: must be 1..65535")
    return MetricsConfig(host, port)
