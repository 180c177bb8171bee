"""The commands that ask the running daemon over its control socket, as plain functions: the
request, what they print (tables or the documented JSON, docs/json.md) and their exit codes. The
typer commands (`daemon.py`, `operate.py`) and the quick path (`quick.py`) both call these, so
they import nothing of typer.

Exit codes: 0 answered; 1 the daemon answered an error (or `cluster ready`: not ready); 2 bad
input (an unknown server name, a bad value: the daemon changed nothing); 3 no daemon answers."""

from __future__ import annotations

import json

from orchestrator.cli.client import BAD_INPUT, FAILED, ask, fail, json_list, table, write
from orchestrator.control_socket import RowsText

TYPE_CHECKING = False  # typing's own costs an import: not on the quick path
if TYPE_CHECKING:
    from typing import Any


LEAVE_TIMEOUT_S = 300.0  # a hand-over of 100,000 sessions is about 800 etcd transactions
NOT_READY = 1


def _show(answer: Any, json_output: bool, text: str) -> None:
    write((json.dumps(answer) if json_output else text) + "\n")


# ---- status, labels, routes ----


def status(json_output: bool, socket: str | None, config: str | None) -> None:
    answer = ask("status", socket, config)
    _show(answer, json_output, "" if json_output else "\n".join(status_lines(answer)))


def status_lines(answer: dict[str, Any]) -> list[str]:
    """`mplsorch status` without --json: role, services, servers, sessions, labels, queue drops and
    the counters that tell of trouble, each on a line."""
    head = f"{answer['role']}  pid {answer['pid']}  up {answer['uptime_s']} s"
    counters = answer.get("counters", {})
    if answer["role"] == "client":
        first, last = answer["range"]
        return [
            head,
            f"VIPs: {', '.join(answer['vips'])}",
            f"labels: {first}-{last}, balancer link {', '.join(answer['balancer_interfaces'])}, "
            f"queue {answer['queue']}",
            f"sessions: {answer['sessions']}",
            _offload_line(answer),
            _counter_line(counters),
        ]
    if answer["role"] == "server":
        first, last = answer["block"]
        return [
            head,
            f"VIPs: {', '.join(answer['vips'])}",
            f"labels: {first}-{last}, queue {answer['queue']}",
            f"sessions: {answer['sessions']}",
            _offload_line(answer),
            _counter_line(counters),
        ]
    labels, health, queue = answer["labels"], answer.get("health", {}), answer.get("queue", {})
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(answer.get("sessions_by_state", {}).items()))
    draining = answer.get("draining") or []
    nft = answer.get("nft_counters", {})
    return [
        head,
        f"services: {', '.join(answer['services'])}",
        f"servers: {health.get('up', 0)} up, {health.get('down', 0)} down, {health.get('unknown', 0)} unknown"
        + (f"; draining: {', '.join(draining)}" if draining else ""),
        f"sessions: {answer['sessions']}"
        + (f" ({by_state})" if by_state else "")
        + "; per server: "
        + ", ".join(f"{k} {v}" for k, v in answer["servers"].items()),
        f"labels: {labels['in_use']} in use, {labels['held_down']} held down, {labels['free']} free "
        f"of {labels['total']} pairs",
        f"queue: {queue.get('waiting', 0)} waiting, {queue.get('queue_dropped', 0)} dropped (queue full), "
        f"{queue.get('user_dropped', 0)} dropped (daemon's buffer full), {nft.get('rate_limited', 0)} rate limited",
        f"dataplane: {answer['dataplane_ops'].get('ok', 0)} operations ok, "
        f"{answer['dataplane_ops'].get('error', 0)} failed",
        _offload_line(answer),
        _counter_line(counters),
    ]


def _offload_line(answer: dict[str, Any]) -> str:
    """Our filters and routes by what the kernel says of their offload (docs/offload.md)."""
    counts = answer.get("offload", {})
    line = "offload: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("in_hw", "not_in_hw", "trap", "offload_failed"))
    if "offload_age_s" not in answer:  # the agents dump on the request
        return line
    age = answer["offload_age_s"]
    return line + (" (no dump yet)" if age is None else f" (a dump {age} s old)")


def _counter_line(counters: dict[str, int]) -> str:
    keys = ("sessions_started", "sessions_ended", "sessions_reassigned", "packets_userspace")
    # A balancer's first packets the kernel's fast path could not take: worth seeing at a glance.
    trouble = sorted(
        (k, v)
        for k, v in counters.items()
        if k.split(":")[0]
        in (
            "refused",
            "malformed",
            "no_route",
            "batch_errors",
            "sessions_failed",
            "fastpath_unmatched",
            "fastpath_late",
            "offload_refused",
        )
    )
    shown = [*((k, counters.get(k, 0)) for k in keys), *trouble]
    if "flows_fast_path" in counters:
        shown.insert(len(keys), ("flows_fast_path", counters["flows_fast_path"]))
    return "counters: " + ", ".join(f"{k} {v}" for k, v in shown)


def labels(json_output: bool, socket: str | None, config: str | None) -> None:
    answer = ask("labels", socket, config)["labels"]
    if json_output:
        _show(answer, True, "")
        return
    row = [answer["total"], answer["in_use"], answer["held_down"], answer["free"]]
    write(table("label pairs", ["total", "in use", "held down", "free"], [row]))


def routes(json_output: bool, socket: str | None, config: str | None) -> None:
    rows = ask("routes", socket, config)["routes"]
    if json_output:
        _show(rows, True, "")
        return
    cells = [[r["object"], r.get("policy"), r["offload"]] for r in rows]
    write(table("kernel objects", ["object", "policy", "offload"], cells))


# ---- sessions, servers, cluster ----


def sessions(json_output: bool, socket: str | None, config: str | None, limit: int | None, offset: int) -> None:
    """The page is printed in one write: the table (or the JSON list) and its footer joined."""
    page = {k: v for k, v in (("limit", limit), ("offset", offset or None)) if v is not None}
    if json_output:  # the rows' text as the daemon sent it (control_socket.with_rows_text)
        rows = ask("sessions", socket, config, rows_text=True, **page)["sessions"]
        write((rows if isinstance(rows, RowsText) else json_list(rows)) + "\n")
        return
    answer = ask("sessions", socket, config, **page)
    rows = answer["sessions"]
    text = _sessions_table(answer, rows)
    if "total" in answer and (limit is not None or offset):
        text += f"sessions {offset + 1}-{offset + len(rows)} of {answer['total']}\n"
    write(text)


def _sessions_table(answer: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    if answer.get("role") == "server":
        return table(
            "sessions",
            ["client", "VIP", "C2S", "S2C", "state", "flows"],
            [[s["client"], s["vip"], s["c2s_label"], s["s2c_label"], s["state"], s["flows"]] for s in rows],
        )
    return table(
        "sessions",
        ["id", "service", "client", "key", "server", "C2S", "S2C", "state", "flows"],
        [
            [
                s["id"],
                s["service"],
                s["client"],
                s["key"],
                s["server"],
                s["c2s_label"],
                s["s2c_label"],
                s["state"],
                s["flows"],
            ]
            for s in rows
        ],
    )


def flush(json_output: bool, socket: str | None, config: str | None, server: str | None, client: str | None) -> None:
    args: dict[str, Any] = {k: v for k, v in (("server", server), ("client", client)) if v is not None}
    answer = ask("flush", socket, config, **args)
    errors = f" ({answer['errors']} kernel operations failed, see the daemon's log)" if answer.get("errors") else ""
    _show(answer, json_output, f"flushed {answer['flushed']} sessions{errors}")
    if answer.get("errors"):
        raise SystemExit(FAILED)


def servers(json_output: bool, socket: str | None, config: str | None) -> None:
    rows = ask("servers", socket, config)["servers"]
    if json_output:
        _show(rows, True, "")
        return
    write(
        table(
            "servers",
            ["server", "pool", "address", "state", "admin", "weight", "sessions", "response ms", "reason"],
            [
                [
                    r["name"],
                    r["pool"],
                    r["address"],
                    r["state"] if r["checked"] else f"{r['state']} (no check)",
                    r["admin"],
                    r["weight"],
                    r["sessions"],
                    None if r["response_time"] is None else f"{r['response_time'] * 1000:.1f}",
                    r["reason"],
                ]
                for r in rows
            ],
        )
    )


def drain(json_output: bool, socket: str | None, config: str | None, name: str) -> None:
    answer = ask("drain", socket, config, server=name)
    _show(
        answer,
        json_output,
        f"{answer['server']}: draining (was {answer['previous']}); "
        f"its {answer['sessions']} sessions stay until they end",
    )


def enable(json_output: bool, socket: str | None, config: str | None, name: str) -> None:
    answer = ask("enable", socket, config, server=name)
    _show(answer, json_output, f"{answer['server']}: enabled (was {answer['previous']})")


def weight(json_output: bool, socket: str | None, config: str | None, name: str, value: int) -> None:
    answer = ask("weight", socket, config, server=name, weight=value)
    moved = ", ".join(f"{svc} {share:.1%}" for svc, share in answer["moved"].items()) or "no maglev service"
    _show(
        answer,
        json_output,
        f"{answer['server']}: weight {answer['weight']} (was {answer['previous']}); keys moved: {moved}",
    )


def cluster_ready(json_output: bool, socket: str | None, config: str | None) -> None:
    cluster = ask("status", socket, config).get("cluster")
    if cluster is None:
        fail("this balancer is not a member of a cluster (no cluster: in its configuration)", BAD_INPUT)
    answer = {"ready": cluster["ready"], "state": cluster["state"], "store": cluster["store"]}
    _show(answer, json_output, f"{cluster['name']}: {cluster['state']}{'' if cluster['ready'] else ' (not ready)'}")
    if not cluster["ready"]:
        raise SystemExit(NOT_READY)


def cluster_leave(json_output: bool, socket: str | None, config: str | None) -> None:
    answer = ask("leave", socket, config, timeout=LEAVE_TIMEOUT_S)
    to = ", ".join(f"{n} to {m}" for m, n in sorted(answer["to"].items())) or "none"
    blocks = ", ".join(map(str, answer["label_blocks"])) or "none"
    _show(
        answer,
        json_output,
        f"left the cluster: {answer['sessions']} sessions handed over ({to}); label blocks given up: {blocks}",
    )
