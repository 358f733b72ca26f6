"""The daemon's log as JSON lines with stable event names, and its size-rotated file."""

import json
import logging
import os
import socket
import struct

from ramfw.daemon import logs
from ramfw.daemon.blocks import BlockLog


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def with_handler(tmp_path, **kwargs):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = logs.setup("json", str(tmp_path / "ramfw.log"), **kwargs)
    return root, saved, handler


def restore(root, saved, handler):
    handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_a_block_is_one_json_object_with_its_event_and_fields(tmp_path):
    root, saved, handler = with_handler(tmp_path)
    try:
        blocks = BlockLog(audit=False)
        blocks.record("registry access to evil.test is not allowed", "203.0.113.9", 443, names=["evil.test"], reason="not_allowlisted")
        blocks.record("registry access to evil.test is not allowed", "203.0.113.9", 443, names=["evil.test"], reason="not_allowlisted")  # throttled
        logging.getLogger("ramfw").info("something else")
        BlockLog(audit=True).record("registry access to x.test is not allowed", "203.0.113.10", 5000, names=["x.test"])
    finally:
        restore(root, saved, handler)
    block, other, audited = lines_of(tmp_path / "ramfw.log")
    assert block["event"] == "block" and block["level"] == "warning" and block["verdict"] == "blocked"
    assert (block["host"], block["address"], block["port"]) == ("evil.test", "203.0.113.9", 443)
    assert block["advice"] == "ask your administrators to add evil.test to your organization's allowed registries"
    assert block["message"] == "registry access to evil.test is not allowed (203.0.113.9 port 443)"
    assert block["destination_names"] == ["evil.test"] and block["reason"] == "not_allowlisted"
    assert block["time"].endswith("Z") and isinstance(block["pid"], int)
    assert other["event"] == "message" and other["message"] == "something else"
    assert audited["verdict"] == "audited" and audited["message"].startswith("audit: would block: ")


def test_the_log_file_is_rotated_by_size(tmp_path):
    root, saved, handler = with_handler(tmp_path, max_bytes=4096)
    try:
        for n in range(200):
            logging.getLogger("ramfw").warning("line %d %s", n, "x" * 40, extra=logs.event("error"))
    finally:
        restore(root, saved, handler)
    assert (tmp_path / "ramfw.log.1").exists() and not (tmp_path / "ramfw.log.4").exists()
    assert all(line["event"] == "error" for line in lines_of(tmp_path / "ramfw.log"))
    assert (tmp_path / "ramfw.log").stat().st_size <= 4096


def test_the_text_form_is_what_it_was(tmp_path):
    record = logging.LogRecord("ramfw", logging.WARNING, __file__, 1, "registry access to %s is not allowed",
                               ("x.test",), None)
    assert logging.Formatter(logs.TEXT_FORMAT).format(record) == (
        f"ramfw[{record.process}]: WARNING: registry access to x.test is not allowed")


def journal_fields(entry: bytes) -> dict:
    """systemd's native format read back: KEY=value lines, or KEY, a 64-bit length and bytes."""
    fields, at = {}, 0
    while at < len(entry):
        end = entry.index(b"\n", at)
        line = entry[at:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            at = end + 1
        else:
            key, (size,) = line, struct.unpack_from("<Q", entry, end + 1)
            value = entry[end + 9:end + 9 + size]
            assert entry[end + 9 + size:end + 10 + size] == b"\n"
            at = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def test_under_systemd_each_line_is_a_journal_entry_with_its_priority_and_message_id(tmp_path):
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = logs.setup("json", journal=str(tmp_path / "journal"))
    try:
        BlockLog(audit=False).record("registry access to evil.test is not allowed", "203.0.113.9", 443,
                                     names=["evil.test"])
        logging.getLogger("ramfw").error("two\nlines")
    finally:
        restore(root, saved, handler)
    block, error = (journal_fields(journal.recv(65536)) for _ in range(2))
    journal.close()
    assert block["MESSAGE"] == "registry access to evil.test is not allowed (203.0.113.9 port 443)"
    assert block["PRIORITY"] == "4" and block["SYSLOG_IDENTIFIER"] == "ramfw" and block["RAMFW_EVENT"] == "block"
    assert block["MESSAGE_ID"] == logs.message_id("block") and len(block["MESSAGE_ID"]) == 32
    assert (block["RAMFW_HOST"], block["RAMFW_ADDRESS"], block["RAMFW_PORT"]) == ("evil.test", "203.0.113.9", "443")
    assert error["MESSAGE"] == "two\nlines" and error["PRIORITY"] == "3"
    assert logs.message_id("block") != logs.message_id("error")


def test_a_journal_that_is_not_there_gets_the_line_on_stderr(tmp_path, capsys):
    handler = logs.JournalHandler(str(tmp_path / "no-journal"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.fallback.stream = open(tmp_path / "stderr", "w")
    handler.emit(logging.LogRecord("ramfw", logging.WARNING, __file__, 1, "still said", (), None))
    handler.fallback.stream.close()
    handler.close()
    assert (tmp_path / "stderr").read_text().strip().endswith("WARNING: still said")


def test_stderr_is_the_journal_only_when_journal_stream_names_it(monkeypatch):
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not logs.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.stderr_is_journal()
