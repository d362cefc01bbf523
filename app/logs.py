"""Structured logs: one JSON object per line on stderr, for the gateway and the workers alike."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

# Attributes every record has; anything else came through `extra=` (uvicorn's colored copy is dropped).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        entry |= {key: value for key, value in vars(record).items() if key not in _STANDARD}  # `extra=` fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


PROBES = ("/healthz", "/readyz")


class QuietProbes(logging.Filter):
    """Drop the access lines of health probes: polled every few seconds (by `make run` while it starts, by
    Docker and load balancers always), they would bury every other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's access record: (client, method, path, http version, status)
        return not (isinstance(args, tuple) and len(args) > 2 and str(args[2]).split("?")[0] in PROBES)


def configure_logging(level: str | int | None = None) -> None:
    """Route every logger (uvicorn's and Celery's included) to one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level if isinstance(level, int) else (level or os.environ.get("HARMONICA_LOG_LEVEL", "info")).upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietProbes) for f in access.filters):
        access.addFilter(QuietProbes())
