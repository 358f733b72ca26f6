"""The daemon's log as JSON lines with stable event names, and its size-rotated file."""

import json
import logging

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
        blocks.record("registry access to evil.test is not allowed", "203.0.113.9", 443, host="evil.test")
        blocks.record("registry access to evil.test is not allowed", "203.0.113.9", 443, host="evil.test")  # throttled
        logging.getLogger("ramfw").info("something else")
        BlockLog(audit=True).record("registry access to x.test is not allowed", "203.0.113.10", 5000, host="x.test")
    finally:
        restore(root, saved, handler)
    block, other, audited = lines_of(tmp_path / "ramfw.log")
    assert block["event"] == "block" and block["level"] == "warning" and block["verdict"] == "blocked"
    assert (block["host"], block["address"], block["port"]) == ("evil.test", "203.0.113.9", 443)
    assert block["message"] == "registry access to evil.test is not allowed (203.0.113.9 port 443)"
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
