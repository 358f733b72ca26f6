"""The daemon's log: human text (the default) or one JSON object per line, to stderr or to a
file rotated by size (LinuxKit and WSL2 have no journald).

A line that matters to a pipeline carries a stable ``event`` name and its fields, given as
``extra={"event": ..., "fields": {...}}``: ``block`` (a connection refused, or in audit mode
let through: ``host``, ``address``, ``port``, ``verdict``), ``tamper_repair`` (``by``),
``scope_widened`` (``why``), ``started``, ``stopped``, ``policy_reloaded``, ``error``. Any
other line is ``message``. The text form is what it always was.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time

TEXT_FORMAT = "ramfw[%(process)d]: %(levelname)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, event, message, pid, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "event": getattr(record, "event", "message"),
                "message": record.getMessage(), "pid": record.process}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup(log_format: str = "text", log_file: str = "", max_bytes: int = 10 << 20) -> logging.Handler:
    """The root logger's one handler, at INFO: stderr, or ``log_file`` rotated at ``max_bytes``
    (three old files kept)."""
    handler: logging.Handler = (logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=3)
                                if log_file else logging.StreamHandler())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def event(name: str, **fields) -> dict:
    """``extra=`` for a log call: the event's name and its fields."""
    return {"event": name, "fields": fields}
