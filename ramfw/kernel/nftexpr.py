"""The pieces of libnftables JSON that ramfw's rules are made of (``ruleset``, ``tlsrules``): pure
data, and the names of the table's sets both use."""

from __future__ import annotations

FAMILY = "inet"
ALLOW = {4: "allow4", 6: "allow6"}
CONTAINER_BRIDGES = "container_bridges"  # bridges whose ports are all veths or taps (``links``)
LOG_RATE, LOG_BURST, LOG_SNAPLEN = 50, 100, 128  # blocked packets named per second; bytes of each


def match(left: dict, right: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def ct_mark() -> dict:
    return {"ct": {"key": "mark"}}


REPLY = match({"ct": {"key": "direction"}}, "reply")
ORIGINAL = match({"ct": {"key": "direction"}}, "original")
SYN_ONLY = match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "syn")
