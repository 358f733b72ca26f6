"""Conntrack marks, over ctnetlink: the verdict a flow's first flight got, kept in the kernel.

The TLS check (``daemon.sni``) reads a flow's first flight in userspace once; its verdict is
written into the flow's conntrack mark, so the ruleset sends none of its later packets to the
queue (allowed: the bits cleared) or resets every one (refused). Written here, not by the queue
verdict (NFQA_CT), because that needs the kernel's ``NETFILTER_NETLINK_GLUE_CT``, which kernels
built without it (this lab's, Firecracker's) ignore silently; ctnetlink is conntrack's own
interface (``conntrack -U --mark``), and only CAP_NET_ADMIN may use it, so no process can forge a
verdict, as it could with a packet mark (SO_MARK needs only CAP_NET_RAW).

The constants are ctnetlink's (include/uapi/linux/netfilter/nfnetlink_conntrack.h), kept here:
no other module speaks it.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct

from . import netlink
from .netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attr, nested

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_TIMEOUT, CTA_MARK, CTA_MARK_MASK = 1, 2, 7, 8, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
TCP = 6

Flow = tuple[str, int, str, int]  # a packet's source, source port, destination, destination port


def _tuple(kind: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    first, second = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if family == socket.AF_INET6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    ip = nested(CTA_TUPLE_IP, attr(first, socket.inet_pton(family, src)), attr(second, socket.inet_pton(family, dst)))
    proto = nested(CTA_TUPLE_PROTO, attr(CTA_PROTO_NUM, bytes([TCP])), attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
                   attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return nested(kind, ip, proto)


def mark_message(flow: Flow, value: int, mask: int, seq: int, timeout: int | None = None, ack: bool = True) -> bytes:
    """Set the ``mask`` bits of the conntrack entry of ``flow`` (as a packet of its client
    direction shows it, after any DNAT) to ``value`` (and its timeout, in seconds). The entry is
    found by its reply tuple, which is the packet's, reversed, whether or not a NAT rule changed
    its destination. Without ``ack`` the kernel answers only a refusal."""
    src, sport, dst, dport = flow
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    attrs = (_tuple(CTA_TUPLE_REPLY, dst, dport, src, sport) + attr(CTA_MARK, struct.pack("!I", value))
             + attr(CTA_MARK_MASK, struct.pack("!I", mask)))
    if timeout is not None:
        attrs += attr(CTA_TIMEOUT, struct.pack("!I", timeout))
    return netlink.message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | (NLM_F_ACK if ack else 0),
                           seq, family, 0, attrs)


def delete_message(flow: Flow, seq: int) -> bytes:
    """Delete the conntrack entry of ``flow`` (found as ``mark_message`` finds it)."""
    src, sport, dst, dport = flow
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return netlink.message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq,
                           family, 0, _tuple(CTA_TUPLE_REPLY, dst, dport, src, sport))


class Marks:
    """One ctnetlink socket that sets the TLS check's bits of flows' conntrack marks."""

    def __init__(self):
        self.sock = netlink.open_socket(rcvbuf=1 << 20)
        self.sock.setsockopt(netlink.SOL_NETLINK, netlink.NETLINK_CAP_ACK, 1)
        self._seq = 1
        self.failed = 0

    def set(self, flow: Flow, value: int, mask: int, timeout: int | None = None) -> None:
        """Synchronous: the kernel has changed the mark when this returns (its answer is read);
        OSError with its errno otherwise (ENOENT: the flow is gone)."""
        self._seq += 1
        self.sock.send(mark_message(flow, value, mask, self._seq, timeout))
        self._answer("setting a mark")

    def forget(self, flow: Flow) -> None:
        """Delete the flow's entry (synchronous; a flow already gone is not an error): its tuple
        starts afresh at its next SYN, and anything else of it is new without a SYN."""
        self._seq += 1
        self.sock.send(delete_message(flow, self._seq))
        with contextlib.suppress(FileNotFoundError):
            self._answer("deleting a flow")

    def _answer(self, what: str) -> None:
        """The kernel's answer to the request numbered ``self._seq``; OSError if it refused."""
        while True:
            try:  # the kernel answers inside send: the ack waits already
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not select.select([self.sock], [], [], 2)[0]:
                    raise OSError(errno.ETIMEDOUT, "conntrack: no answer from the kernel within 2 s") from None
                continue
            for kind, start, _ in netlink.messages(data):
                if kind != NLMSG_ERROR:
                    continue
                (code,) = struct.unpack_from("=i", data, start)
                answered = netlink.HEADER.unpack_from(data, start - netlink.HEADER.size)[3]
                if answered != self._seq:
                    self.failed += bool(code)  # an unacknowledged change (``send``) the kernel refused
                elif code:
                    raise OSError(-code, f"conntrack: {what}: {errno.errorcode.get(-code, code)}")
                else:
                    return

    def send(self, flow: Flow, value: int, mask: int) -> None:
        """Fire and forget: the kernel makes the change inside ``send`` and answers only a refusal,
        counted in ``failed`` when read (``refusals``)."""
        self._seq += 1
        self.sock.send(mark_message(flow, value, mask, self._seq, ack=False))

    def refusals(self) -> int:
        """How many changes sent without waiting the kernel refused so far."""
        while True:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return self.failed
            for kind, start, _ in netlink.messages(data):
                if kind == NLMSG_ERROR and struct.unpack_from("=i", data, start)[0]:
                    self.failed += 1

    def marked(self, value: int, mask: int) -> list[Flow]:
        """The TCP flows whose mark has ``value`` in its ``mask`` bits, as a packet of their client
        direction shows them (their reply tuple, reversed: after any DNAT)."""
        self._seq += 1
        seq = self._seq
        filt = attr(CTA_MARK, struct.pack("!I", value)) + attr(CTA_MARK_MASK, struct.pack("!I", mask))
        self.sock.send(netlink.message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP,
                                       seq, socket.AF_UNSPEC, 0, filt))
        found: list[Flow] = []
        while True:
            if not select.select([self.sock], [], [], 5)[0]:
                raise OSError(errno.ETIMEDOUT, "conntrack: the dump did not end within 5 s")
            data = self.sock.recv(1 << 20)
            for kind, start, end in netlink.messages(data):
                if netlink.HEADER.unpack_from(data, start - netlink.HEADER.size)[3] != seq:
                    continue
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return found
                flow = _reply_flow(netlink.parse_attrs(data, start + netlink.NFGEN.size, end))
                if flow is not None:
                    found.append(flow)

    def close(self) -> None:
        self.sock.close()


def _reply_flow(attrs: dict[int, bytes]) -> Flow | None:
    """The client direction's packet tuple, from an entry's reply tuple (reversed)."""
    reply = netlink.parse_attrs(attrs.get(CTA_TUPLE_REPLY, b""))
    ip, proto = netlink.parse_attrs(reply.get(CTA_TUPLE_IP, b"")), netlink.parse_attrs(reply.get(CTA_TUPLE_PROTO, b""))
    if proto.get(CTA_PROTO_NUM) != bytes([TCP]):
        return None
    for first, second, family in ((CTA_IP_V4_SRC, CTA_IP_V4_DST, socket.AF_INET),
                                  (CTA_IP_V6_SRC, CTA_IP_V6_DST, socket.AF_INET6)):
        if first in ip and second in ip:
            try:
                src, dst = socket.inet_ntop(family, ip[second]), socket.inet_ntop(family, ip[first])
                sport = struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0]
                dport = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0]
            except (KeyError, ValueError, struct.error):
                return None
            return src, sport, dst, dport
    return None
