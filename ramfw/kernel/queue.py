"""The netfilter packet queue (nfnetlink_queue), spoken directly over a netlink socket.

No library sits between ramfw and the kernel here: a reply held in the queue costs one
``recv`` and one ``send``, and nothing in a packet can make this module raise (the payload is
handed up as bytes; parsing it is the caller's business).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import netlink
from .netlink import (NF_ACCEPT, NF_DROP, NFNL_SUBSYS_QUEUE, NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN,
                      NFQA_PACKET_HDR, NFQA_PAYLOAD, NFQA_VERDICT_HDR, NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND,
                      NFQNL_COPY_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NLM_F_REQUEST, attr,
                      u32)

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
        self.sock = netlink.open_socket()
        try:
            self._config(attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
            self._config(attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET))
                         + u32(NFQA_CFG_QUEUE_MAXLEN, maxlen))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)  # the daemon's loop must never wait here

    def _config(self, attrs: bytes) -> None:
        netlink.request(self.sock, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, self.queue_num, attrs,
                        f"netfilter queue {self.queue_num}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, bufsize: int = 1 << 17) -> list[Packet]:
        """The packets of the next waiting datagram; [] at once when none waits."""
        try:
            data = self.sock.recv(bufsize)
        except BlockingIOError:
            return []
        packets = []
        for msg_type, start, end in netlink.messages(data):
            if msg_type != _PACKET:
                continue
            attrs = netlink.parse_attrs(data, start + netlink.NFGEN.size, end)
            header = attrs.get(NFQA_PACKET_HDR)
            if header is not None and len(header) >= 4:
                packets.append(Packet(struct.unpack_from("!I", header)[0], attrs.get(NFQA_PAYLOAD, b"")))
        return packets

    def verdict(self, packet_id: int, verdict: int = NF_ACCEPT) -> None:
        self.sock.send(netlink.message((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0,
                                       self.queue_num,
                                       attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))

    def close(self) -> None:
        try:
            self._config(attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)))
        except OSError:
            pass
        self.sock.close()


def probe(queue_num: int = 7) -> None:
    """Bind and unbind a queue; raise OSError when this kernel has no nfnetlink_queue."""
    Queue(queue_num).close()
