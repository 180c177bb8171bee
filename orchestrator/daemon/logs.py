"""The daemon's log: text lines (the default, for people and `grep`) or JSON lines (`mplsorch
run --log-format json`, for log shippers). The text is the same either way; a record may carry
structured fields (`extra=fields(...)`), which JSON lines show as keys of their own.

What is logged at info: start, reload, stop, one line per session start and end, server health
changes and operator commands; never one line per packet. Every refusal and failure is logged
with its reason (warning or error), per packet up to `Throttle`'s cap a second per reason: a
flood of bad first packets is counted in full, not written out in full.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
TEXT = "%(asctime)s mplsorch %(levelname)s %(message)s"


class Throttle:
    """At most `per_second` lines a second per key; the rest counted, their number said once the
    next second's first line for that key is allowed (`allow` returns it)."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self.windows: dict[str, tuple[int, int, int]] = {}  # key -> (second, allowed, suppressed)

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        """(whether to log this line, lines suppressed since the last one logged for this key)."""
        second = int(now)
        start, allowed, suppressed = self.windows.get(key, (second, 0, 0))
        if start != second:
            self.windows[key] = (second, 1, 0)
            return True, suppressed
        if allowed < self.per_second:
            self.windows[key] = (start, allowed + 1, 0)
            return True, suppressed
        self.windows[key] = (start, allowed, suppressed + 1)
        return False, 0


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` of a log call: structured fields for JSON lines."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (Unix seconds), level, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 6),
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update({k: v for k, v in extra.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(log_format: str = "text") -> None:
    """Log to stderr at info in the given format (ValueError for another)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
