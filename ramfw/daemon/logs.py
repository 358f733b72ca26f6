"""The daemon's log: human text (the default) or one JSON object per line, to stderr or to a
file rotated by size (LinuxKit and WSL2 have no journald).

A line that matters to a pipeline carries a stable ``event`` name and its fields, given as
``extra={"event": ..., "fields": {...}}``: ``block`` (a connection refused, or in audit mode
let through: ``host``, ``address``, ``port``, ``verdict``), ``tamper_repair`` (``by``),
``scope_widened`` (``why``), ``started``, ``stopped``, ``policy_reloaded``, ``error``. Any
other line is ``message``. The text form is what it always was.

Under systemd (stderr is the journal: ``$JOURNAL_STREAM`` names it) every line goes to the
journal over its native protocol instead, with ``PRIORITY``, a ``MESSAGE_ID`` per event
(``message_id``: stable across releases) and the fields as ``RAMFW_<FIELD>``: ``journalctl
MESSAGE_ID=<block's id>`` lists the blocks. Written here rather than with python3-systemd:
one datagram of ``KEY=value`` lines is all it takes, the image for LinuxKit needs no extra
package, and the tests read it from a socket of their own.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import struct
import time
import uuid

TEXT_FORMAT = "ramfw[%(process)d]: %(levelname)s: %(message)s"


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


JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


def message_id(event_name: str) -> str:
    """The journal's MESSAGE_ID of an event: derived from its name, so the same in every release."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"urn:ramfw:event:{event_name}").hex


def journal_entry(record: logging.LogRecord, text: str) -> bytes:
    """One entry in the journal's native format; a value holding a newline goes as its length
    and bytes (systemd's protocol)."""
    event_name = getattr(record, "event", "message")
    fields = {"MESSAGE": text, "PRIORITY": _PRIORITY.get(record.levelname, 6), "SYSLOG_IDENTIFIER": "ramfw",
              "MESSAGE_ID": message_id(event_name), "RAMFW_EVENT": event_name,
              **{"RAMFW_" + "".join(c if c.isalnum() else "_" for c in key).upper(): value
                 for key, value in getattr(record, "fields", {}).items()}}
    out = bytearray()
    for key, value in fields.items():
        data = (value if isinstance(value, str) else json.dumps(value, default=str)).encode()
        out += (key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n" if b"\n" in data
                else key.encode() + b"=" + data + b"\n")
    return bytes(out)


class JournalHandler(logging.Handler):
    """Entries to journald's socket; a line it cannot take goes to stderr (the journal's stream)."""

    def __init__(self, path: str = JOURNAL_SOCKET):
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = logging.StreamHandler()
        self.fallback.setFormatter(logging.Formatter(TEXT_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(journal_entry(record, self.format(record)), self.path)
        except OSError:
            self.fallback.emit(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=<device>:<inode> when stderr is connected to the journal."""
    try:
        st = os.fstat(2)
        return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"
    except OSError:
        return False


def setup(log_format: str = "text", log_file: str = "", max_bytes: int = 10 << 20,
          journal: str | None = None) -> logging.Handler:
    """The root logger's one handler, at INFO: ``log_file`` rotated at ``max_bytes`` (three old
    files kept), else the journal when stderr is the journal (``journal``: its socket), else
    stderr."""
    if journal is None and stderr_is_journal():
        journal = JOURNAL_SOCKET
    handler: logging.Handler = (logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=3)
                                if log_file else JournalHandler(journal) if journal else logging.StreamHandler())
    if isinstance(handler, JournalHandler):  # the journal keeps the pid, the level, the time
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
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
