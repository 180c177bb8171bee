"""Configuration of health checks (`pools.P.health_check`), `services.V.on_server_failure` and
`metrics`: defaults, every rule with its file, line and key path, and the `config show` round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, parse_config
from orchestrator.config.model import HealthCheck, HealthCheckType, MetricsConfig, ServerFailure

EXAMPLE = Path(__file__).resolve().parents[2] / "templates" / "balancer.example.yaml"

BASE = """\
role: balancer
node:
  transport_label: 100
interfaces:
  clients: [lan0]
  fabric: [fab0]
  fabric_next_hop: 10.255.0.2
labels:
  range: [1000, 1999]
pools:
  web:
    servers:
      s1: {address: 10.1.1.10, transport_label: 101}
      s2: {address: 10.1.1.11, transport_label: 102}
services:
  http:
    vip: 10.0.0.100
    protocol: tcp
    ports: [80]
    pool: web
"""


def with_check(body: str) -> str:
    """BASE with `body` (lines indented under health_check:) in pool web."""
    lines = "".join(f"      {line}\n" for line in body.splitlines())
    return BASE.replace("pools:\n  web:\n", "pools:\n  web:\n    health_check:\n" + lines)


def assert_error(text: str, marker: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lb.yaml")
    e = info.value
    line = next(i + 1 for i, text_line in enumerate(text.splitlines()) if marker in text_line)
    assert (e.source, e.line, e.path) == ("lb.yaml", line, path), str(e)
    assert fragment in e.message, str(e)


def test_absent_means_no_checks_reassign_and_no_metrics() -> None:
    cfg = parse_config(BASE)
    assert cfg.pool("web").health_check is None
    assert cfg.service("http").on_server_failure is ServerFailure.REASSIGN
    assert cfg.metrics is None
    d = cfg.to_dict()
    assert d["pools"]["web"]["health_check"] is None and d["metrics"] is None
    assert d["services"]["http"]["on_server_failure"] == "reassign"


def test_tcp_check_defaults() -> None:
    check = parse_config(with_check("type: tcp\nport: 80")).pool("web").health_check
    assert check == HealthCheck(HealthCheckType.TCP, 80)
    assert (check.interval, check.timeout, check.rise, check.fall) == (2.0, 1.0, 2, 3)


def test_http_check_all_keys() -> None:
    check = (
        parse_config(
            with_check(
                "type: http\nport: 8080\ninterval: 5s\ntimeout: 500ms\nrise: 1\nfall: 5\npath: /healthz?full=1\n"
                "expect_status: [200, 204]\nhost: www.example.org"
            )
        )
        .pool("web")
        .health_check
    )
    assert check == HealthCheck(
        HealthCheckType.HTTP, 8080, 5.0, 0.5, 1, 5, "/healthz?full=1", (200, 204), "www.example.org"
    )
    single = parse_config(with_check("type: http\nport: 80\nexpect_status: 301")).pool("web").health_check
    assert single is not None and single.expect_status == (301,) and single.path == "/" and single.host is None


def test_udp_check_bytes() -> None:
    check = (
        parse_config(with_check('type: udp\nport: 53\nsend: "\\x12\\x34\\x01\\x00ping"\nexpect: "\\xff"'))
        .pool("web")
        .health_check
    )
    assert check is not None and check.send == b"\x12\x34\x01\x00ping" and check.expect == b"\xff"
    any_answer = parse_config(with_check("type: udp\nport: 7\nsend: hello")).pool("web").health_check
    assert any_answer is not None and any_answer.expect is None


def test_null_health_check_is_no_check() -> None:
    assert (
        parse_config(with_check("").replace("health_check:\n", "health_check: null\n")).pool("web").health_check is None
    )


@pytest.mark.parametrize(
    "body,marker,key,fragment",
    [
        ("port: 80", "health_check:", "pools.web.health_check.type", "required key is missing"),
        ("type: tcp", "health_check:", "pools.web.health_check.port", "required key is missing"),
        (
            "type: icmp\nport: 1",
            "type: icmp",
            "pools.web.health_check.type",
            "unknown health check type 'icmp'; expected one of tcp, http, udp",
        ),
        ("type: tcp\nport: 0", "port: 0", "pools.web.health_check.port", "port 0 is out of range"),
        ("type: tcp\nport: 80\ninterval: 0s", "interval: 0s", "pools.web.health_check.interval", "must be > 0"),
        (
            "type: tcp\nport: 80\ninterval: 1s\ntimeout: 2s",
            "timeout: 2s",
            "pools.web.health_check.timeout",
            "timeout 2s must be > 0 and <= interval 1s",
        ),
        ("type: tcp\nport: 80\ntimeout: 0", "timeout: 0", "pools.web.health_check.timeout", "must be > 0"),
        (
            "type: tcp\nport: 80\ninterval: 500ms",
            "interval: 500ms",
            "pools.web.health_check.interval",
            "timeout 1s must be > 0 and <= interval 0.5s",
        ),
        ("type: tcp\nport: 80\nrise: 0", "rise: 0", "pools.web.health_check.rise", "rise 0 is out of range"),
        ("type: tcp\nport: 80\nfall: many", "fall: many", "pools.web.health_check.fall", "expected an integer"),
        (
            "type: tcp\nport: 80\npath: /x",
            "path: /x",
            "pools.web.health_check.path",
            "path is only used with type: http, this check is tcp",
        ),
        ("type: http\nport: 80\nsend: x", "send: x", "pools.web.health_check.send", "only used with type: udp"),
        (
            "type: http\nport: 80\npath: healthz",
            "path: healthz",
            "pools.web.health_check.path",
            "'healthz' is not a request path",
        ),
        ('type: http\nport: 80\npath: "/a b"', "path:", "pools.web.health_check.path", "no spaces"),
        ('type: http\nport: 80\npath: "/a\\n"', "path:", "pools.web.health_check.path", "no spaces"),
        ('type: http\nport: 80\nhost: "a\\n"', "host:", "pools.web.health_check.host", "not a Host header value"),
        (
            "type: http\nport: 80\nexpect_status: 99",
            "expect_status",
            "pools.web.health_check.expect_status",
            "status 99 is out of range: must be 100..599",
        ),
        (
            "type: http\nport: 80\nexpect_status: [200, 200]",
            "expect_status",
            "pools.web.health_check.expect_status[1]",
            "status 200 is listed twice",
        ),
        (
            "type: http\nport: 80\nexpect_status: []",
            "expect_status",
            "pools.web.health_check.expect_status",
            "at least one status",
        ),
        (
            'type: http\nport: 80\nhost: "a\\r\\nX: y"',
            "host:",
            "pools.web.health_check.host",
            "not a Host header value",
        ),
        ("type: udp\nport: 53", "health_check:", "pools.web.health_check.send", "required key is missing"),
        ('type: udp\nport: 53\nsend: "\\u20ac"', "send:", "pools.web.health_check.send", "is not a byte"),
        ("type: tcp\nport: 80\nretries: 3", "retries", "pools.web.health_check.retries", "unknown key"),
    ],
)
def test_health_check_errors(body: str, marker: str, key: str, fragment: str) -> None:
    assert_error(with_check(body), marker, key, fragment)


def test_on_server_failure() -> None:
    cfg = parse_config(BASE + "    on_server_failure: reset\n")
    assert cfg.service("http").on_server_failure is ServerFailure.RESET
    assert_error(
        BASE + "    on_server_failure: retry\n",
        "on_server_failure",
        "services.http.on_server_failure",
        "unknown server failure policy 'retry'; expected one of reassign, reset",
    )


@pytest.mark.parametrize(
    "text,host,port,listen",
    [
        ('metrics: {listen: "127.0.0.1:9469"}', "127.0.0.1", 9469, "127.0.0.1:9469"),
        ("metrics: {}", "127.0.0.1", 9469, "127.0.0.1:9469"),
        ('metrics:\n  listen: "[::1]:9100"', "::1", 9100, "[::1]:9100"),
        ('metrics: {listen: "0.0.0.0:80"}', "0.0.0.0", 80, "0.0.0.0:80"),
    ],
)
def test_metrics(text: str, host: str, port: int, listen: str) -> None:
    cfg = parse_config(BASE + text + "\n")
    assert cfg.metrics == MetricsConfig(host, port) and cfg.metrics.listen == listen


def test_metrics_null_is_off() -> None:
    assert parse_config(BASE + "metrics: null\n").metrics is None


@pytest.mark.parametrize(
    "value,fragment",
    [
        ('"localhost:9469"', "is not an address to listen on"),
        ('"127.0.0.1"', "is not an address to listen on"),
        ('"::1:9469"', "is not an address to listen on"),
        ('"127.0.0.1:70000"', "port 70000 is out of range"),
        ('"127.0.0.1:9469\\n"', "is not an address to listen on"),
        ("9469", "expected a non-empty string"),
    ],
)
def test_metrics_errors(value: str, fragment: str) -> None:
    assert_error(BASE + f"metrics:\n  listen: {value}\n", "listen:", "metrics.listen", fragment)


def test_metrics_unknown_key() -> None:
    assert_error(BASE + "metrics:\n  port: 9469\n", "port: 9469", "metrics.port", "unknown key")


def test_metrics_is_a_key_of_both_roles() -> None:
    server = Path(__file__).resolve().parents[2] / "templates" / "server.example.yaml"
    cfg = parse_config(server.read_text() + "metrics: {}\n", "s1.yaml")
    assert cfg.metrics == MetricsConfig()  # the server agent has its endpoint too (issue 13)


def test_show_round_trip_with_every_new_key() -> None:
    text = (
        with_check('type: udp\nport: 53\nsend: "\\x00\\x01q"\nexpect: "\\xffok"')
        + '    on_server_failure: reset\nmetrics: {listen: "[fd00::1]:9469"}\n'
    )
    text = text.replace(
        "pools:\n",
        "pools:\n  api:\n    health_check: {type: http, port: 8080, path: /h, "
        "expect_status: [200, 204], host: api.example}\n    servers:\n"
        "      s9: {address: 10.1.1.19, transport_label: 109}\n",
        1,
    )
    cfg = parse_config(text)
    assert parse_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False)) == cfg
    assert parse_config(json.dumps(cfg.to_dict())) == cfg
    assert cfg.to_dict()["pools"]["web"]["health_check"]["send"] == "\x00\x01q"


def uncomment(text: str, first: str) -> str:
    """The example with the commented block that starts with the line `# {first}` made active
    (its lines lose their first "# "; lines commented twice stay comments)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"# {first}"))
    indent = lines[start].index("#")
    i = start
    while i < len(lines) and lines[i].startswith(" " * indent + "#"):
        lines[i] = lines[i].replace("# ", "", 1)
        i += 1
    return "".join(lines)


def test_example_documents_health_check_and_metrics_and_they_validate() -> None:
    text = EXAMPLE.read_text()
    off = parse_config(text)
    assert off.pool("web").health_check is None and off.metrics is None  # commented out: off
    assert off.service("http").on_server_failure is ServerFailure.REASSIGN
    cfg = parse_config(uncomment(uncomment(text, "health_check:"), "metrics:"))
    assert cfg.pool("web").health_check == HealthCheck(
        HealthCheckType.HTTP, 80, 2.0, 1.0, 2, 3, "/", (200,), "www.example.org"
    )
    assert cfg.metrics == MetricsConfig("127.0.0.1", 9469)
    assert cfg.pool("web").health_check == parse_config(uncomment(text, "health_check:")).pool("web").health_check
    # The udp lines of the block, uncommented too, describe a valid udp check.
    udp = uncomment(uncomment(text, "health_check:"), "send:").replace("type: http", "type: udp")
    for key in ("path", "expect_status", "host"):
        udp = "".join(x for x in udp.splitlines(keepends=True) if not x.lstrip().startswith(key + ":"))
    check = parse_config(udp).pool("web").health_check
    assert check is not None and check.send == b"ping\n"
