"""The netfilter packet queue (nfnetlink_queue), spoken directly over a netlink socket.

No library sits between ramfw and the kernel here: a reply held in the queue costs one
``recv`` and one ``send``, and nothing in a packet can make this module raise (the payload is
handed up as bytes; parsing it is the caller's business).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from . import netlink
from .netlink import (NF_ACCEPT, NF_DROP, NFNL_SUBSYS_QUEUE, NFQA_CFG_CMD, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_FLAGS,
                      NFQA_CFG_MASK, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_PACKET_HDR, NFQA_PAYLOAD,
                      NFQA_VERDICT_HDR, NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND, NFQNL_COPY_PACKET,
                      NFQNL_MSG_CONFIG, NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NLM_F_REQUEST, attr, u32)

__all__ = ["NF_ACCEPT", "NF_DROP", "Packet", "Queue", "probe"]
_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET


@dataclass(frozen=True)
class Packet:
    packet_id: int
    payload: bytes


class Queue:
    """One bound netfilter queue, copying whole packets to this process."""

    def __init__(self, queue_num: int, maxlen: int = 4096):
        self.queue_num = queue_num
        self._kept: list[Packet] = []
        self.sock = netlink.open_socket()
        try:
            # one request: no packet is queued between the binding and its parameters (copied
            # without its payload, as a new queue's default is)
            self._config(attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0))
                         + attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET))
                         + u32(NFQA_CFG_QUEUE_MAXLEN, maxlen))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)  # the daemon's loop must never wait here

    def _config(self, attrs: bytes) -> None:
        """Packets read while waiting for the kernel's ack are kept for ``receive`` (the socket
        no longer says they wait: whoever binds a queue reads it once at once)."""
        netlink.request(self.sock, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, self.queue_num, attrs,
                        f"netfilter queue {self.queue_num}", other=self._keep)

    def _keep(self, data: bytes, msg_type: int, start: int, end: int) -> None:
        packet = _packet(data, msg_type, start, end)
        if packet is not None:
            self._kept.append(packet)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, bufsize: int = 1 << 17) -> list[Packet]:
        """The packets of the next waiting datagram; [] at once when none waits."""
        if self._kept:
            packets, self._kept = self._kept, []
            return packets
        try:
            data = self.sock.recv(bufsize)
        except BlockingIOError:
            return []
        return [p for m in netlink.messages(data) if (p := _packet(data, *m)) is not None]

    def verdict(self, packet_id: int, verdict: int = NF_ACCEPT) -> None:
        self.sock.send(self._verdict(packet_id, verdict))

    def verdicts(self, given: list[tuple[int, int]]) -> None:
        """Several verdicts, (packet id, verdict) in order, in one system call."""
        self.sock.send(b"".join(self._verdict(packet_id, verdict) for packet_id, verdict in given))

    def _verdict(self, packet_id: int, verdict: int) -> bytes:
        return netlink.message((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, self.queue_num,
                               attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)))

    def close(self, release: Callable[[Packet], None] | None = None) -> None:
        """Unbind and close. The kernel drops what an unbound queue still holds, so with
        ``release`` every packet held is first handed to it for its verdict, while no new one
        is held: a queue that is full (its length set to 0) and fails open lets new packets
        pass at once, as its bypass does once it is unbound."""
        try:
            if release is not None:
                self._config(u32(NFQA_CFG_QUEUE_MAXLEN, 0) + u32(NFQA_CFG_FLAGS, NFQA_CFG_F_FAIL_OPEN)
                             + u32(NFQA_CFG_MASK, NFQA_CFG_F_FAIL_OPEN))
                self._release_all(release)
            self._config(attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)))
        except OSError:
            pass
        self.sock.close()

    def _release_all(self, release: Callable[[Packet], None]) -> None:
        """Every held packet is in the socket's buffer (or was dropped when it could not be)."""
        for _ in range(1 << 16):
            try:
                packets = self.receive()
            except OSError:  # ENOBUFS: an overrun is reported once; what was queued still waits
                continue
            if not packets:
                return
            for packet in packets:
                release(packet)


def _packet(data: bytes, msg_type: int, start: int, end: int) -> Packet | None:
    if msg_type != _PACKET:
        return None
    attrs = netlink.parse_attrs(data, start + netlink.NFGEN.size, end)
    header = attrs.get(NFQA_PACKET_HDR)
    if header is None or len(header) < 4:
        return None
    return Packet(struct.unpack_from("!I", header)[0], attrs.get(NFQA_PAYLOAD, b""))


def probe(queue_num: int = 7) -> None:
    """Bind and unbind a queue; raise OSError when this kernel has no nfnetlink_queue."""
    Queue(queue_num).close()
