"""The netfilter packet queue (nfnetlink_queue), spoken directly over a netlink socket.

No library sits between ramfw and the kernel here: a reply held in the queue costs one
``recv`` and one ``send``, and nothing in a packet can make this module raise (the payload is
handed up as bytes; parsing it is the caller's business).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 2, 3, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5


@dataclass(frozen=True)
class Packet:
    packet_id: int
    payload: bytes


def _attr(kind: int, data: bytes) -> bytes:
    length = _ATTR.size + len(data)
    return _ATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def _message(msg_type: int, queue_num: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(queue_num)) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def parse_attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    attrs = {}
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            break
        attrs[kind & 0x7FFF] = data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3
    return attrs


class Queue:
    """One bound netfilter queue, copying whole packets to this process."""

    def __init__(self, queue_num: int, maxlen: int = 4096, rcvbuf: int = 8 << 20):
        self.queue_num = queue_num
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self.sock.bind((0, 0))
            self._seq = 0
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
            self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET))
                         + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)))
        except BaseException:
            self.sock.close()
            raise

    def _config(self, attrs: bytes) -> None:
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue_num, attrs, NLM_F_REQUEST | NLM_F_ACK, self._seq))
        while True:
            data = self.sock.recv(65536)
            length, msg_type, _, seq, _ = _NLMSG.unpack_from(data, 0)
            if msg_type == NLMSG_ERROR and seq == self._seq:
                (code,) = struct.unpack_from("=i", data, _NLMSG.size)
                if code:
                    raise OSError(-code, f"netfilter queue {self.queue_num}: {errno.errorcode.get(-code, code)}")
                return

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, bufsize: int = 1 << 17) -> list[Packet]:
        """Block for the next datagram; return the packets in it (one or more)."""
        data = self.sock.recv(bufsize)
        packets = []
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, msg_type, _, _, _ = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                break
            if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = parse_attrs(data, offset + _NLMSG.size + _NFGEN.size, offset + length)
                header = attrs.get(NFQA_PACKET_HDR)
                if header is not None and len(header) >= 4:
                    packets.append(Packet(struct.unpack_from("!I", header)[0], attrs.get(NFQA_PAYLOAD, b"")))
            offset += (length + 3) & ~3
        return packets

    def verdict(self, packet_id: int, verdict: int = NF_ACCEPT) -> None:
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue_num,
                                _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))

    def close(self) -> None:
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)))
        except OSError:
            pass
        self.sock.close()


def probe(queue_num: int = 7) -> None:
    """Bind and unbind a queue; raise OSError when this kernel has no nfnetlink_queue."""
    Queue(queue_num).close()
