"""The netfilter netlink primitives ramfw speaks directly: attributes, messages, acks, and
every nfnetlink / nf_tables constant ramfw uses (include/uapi/linux/netfilter/*.h), in one place.

Shared by the packet queue, the NFLOG reader and the nf_tables messages libnftables' JSON
cannot express or would make too slow (``nft``).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct

from ..errors import ResourceBusy

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x2, 0x4, 0x300, 0x400, 0x800
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS, NETLINK_CAP_ACK = 5, 10
SO_SNDBUFFORCE = 32
HEADER = struct.Struct("=IHHII")

# nfnetlink subsystems and batches
NFNL_SUBSYS_QUEUE, NFNL_SUBSYS_ULOG, NFNL_SUBSYS_NFTABLES = 3, 4, 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}

# nf_tables messages and attributes
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE = 6, 7, 8
NFT_MSG_NEWSET, NFT_MSG_GETSET = 9, 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NFT_MSG_DESTROYTABLE = 26  # a DELTABLE that is not an error when the table is missing (Linux 6.3)
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_OWNER = 1, 2, 7
# owner: only the creating netlink socket may change the table; persist: it outlives that socket
NFT_TABLE_F_DORMANT, NFT_TABLE_F_OWNER, NFT_TABLE_F_PERSIST = 0x1, 0x2, 0x4
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_USERDATA = 1, 4, 5, 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0  # libnftnl's user data: how `nft` stores an element comment
NFT_REG_1, NFT_REG_VERDICT = 1, 0
NFT_SOCKET_CGROUPV2 = 3  # socket expression key: the cgroup v2 id of the packet's socket, at a level
NF_ACCEPT_VERDICT = 1
NFT_META_NFPROTO, NFT_META_L4PROTO = 15, 16
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG = 1, 2
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_CT_STATE, NFT_CT_DIRECTION = 0, 1  # ct expression keys
CT_STATE_ESTABLISHED, CT_DIR_REPLY = 1 << 1, 1  # NF_CT_STATE_BIT(IP_CT_ESTABLISHED); IP_CT_DIR_REPLY
NFT_FIB_RESULT_OIF = 1
NFTA_FIB_F_SADDR, NFTA_FIB_F_IIF, NFTA_FIB_F_PRESENT = 1 << 0, 1 << 3, 1 << 5
NFT_OBJECT_COUNTER = 1
NFQ_FLAG_BYPASS = 0x01

# nfnetlink_queue
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NF_DROP, NF_ACCEPT = 0, 1

# nfnetlink_log (NFLOG)
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 4, 5
NFULA_PAYLOAD = 9
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")


def attr(kind: int, data: bytes) -> bytes:
    length = _ATTR.size + len(data)
    return _ATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!I", value))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def message(msg_type: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = NFGEN.pack(family, 0, socket.htons(res_id)) + attrs
    return HEADER.pack(HEADER.size + len(body), msg_type, flags, seq, 0) + body


def batch(steps: list[tuple[int, int, int, bytes]], seq: int = 1) -> bytes:
    """One nf_tables transaction: (message type, flags, family, attributes) of each step,
    between a batch begin and end; the kernel commits all of it or nothing."""
    messages = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")]
    for offset, (msg_type, flags, family, attrs) in enumerate(steps, start=1):
        messages.append(message((NFNL_SUBSYS_NFTABLES << 8) | msg_type, NLM_F_REQUEST | flags, seq + offset,
                                family, 0, attrs))
    messages.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(steps) + 1, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(messages)


def iter_attrs(data: bytes, offset: int = 0, end: int | None = None):
    """(kind, value) of each attribute in order; stops quietly at anything malformed."""
    end = len(data) if end is None else end
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            return
        yield kind & 0x7FFF, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def parse_attrs(data: bytes, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """Attributes by kind (the last one wins)."""
    return dict(iter_attrs(data, offset, end))


def messages(data: bytes):
    """(type, payload offset, end) of each message in a datagram."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, msg_type, _, _, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            return
        yield msg_type, offset + HEADER.size, offset + length
        offset += (length + 3) & ~3


SO_RCVBUFFORCE = 33  # asm-generic/socket.h (CAP_NET_ADMIN)


def open_socket(rcvbuf: int = 8 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:  # past net.core.rmem_max (often 208 KiB): a queue's or a log's burst must fit
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:  # not root (status, the tests' unprivileged clients)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def dump(sock: socket.socket, msg_type: int, family: int, attrs: bytes, seq: int, single: bool = False):
    """Send an nf_tables GET (a dump, or with ``single`` one object) and yield the attributes of
    each object answered; OSError with the kernel's errno when it refuses (ENOENT: no such table)."""
    flags = NLM_F_REQUEST | (0 if single else NLM_F_DUMP)
    sock.send(message((NFNL_SUBSYS_NFTABLES << 8) | msg_type, flags, seq, family, 0, attrs))
    while True:
        if not select.select([sock], [], [], 5)[0]:
            raise OSError(errno.ETIMEDOUT, "nf_tables dump: no answer from the kernel within 5 s")
        data = sock.recv(1 << 20)
        for kind, start, end in messages(data):
            if HEADER.unpack_from(data, start - HEADER.size)[3] != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, start)
                if code:
                    raise OSError(-code, f"nf_tables dump: {errno.errorcode.get(-code, code)}")
                return
            yield data[start + NFGEN.size : end]
            if single:
                return


def transact(sock: socket.socket, steps: list, seq: int, what: str, refused: list[str]) -> None:
    """One nf_tables transaction, every step acknowledged; OSError with the kernel's errno (and
    the step) when refused. Refusals of unacknowledged batches sent earlier on the socket (other
    sequence numbers) go to ``refused``."""
    sock.send(batch([(m, f | NLM_F_ACK, fam, a) for m, f, fam, a in steps], seq))
    waiting, failed = set(range(seq + 1, seq + len(steps) + 1)), None
    while waiting:
        if not select.select([sock], [], [], 10)[0]:
            raise OSError(errno.ETIMEDOUT, f"{what}: no answer from the kernel within 10 s")
        data = sock.recv(1 << 20)
        for kind, start, _ in messages(data):
            if kind != NLMSG_ERROR:
                continue
            (code,) = struct.unpack_from("=i", data, start)
            answered = HEADER.unpack_from(data, start - HEADER.size)[3]
            if answered in waiting or answered == seq:  # seq: the whole batch refused at commit
                waiting = set() if answered == seq else waiting - {answered}
                failed = failed or (code and (-code, answered - seq))
            elif code:
                refused.append(f"{os.strerror(-code)} ({errno.errorcode.get(-code, code)})")
    if failed:
        code, step = failed
        raise OSError(code, f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)}"
                      + (f", step {step} of {len(steps)})" if step else ")"))


def drain(sock: socket.socket) -> None:
    """Read and drop what waits on a non-blocking socket (wake-ups, change notifications)."""
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:  # BlockingIOError: empty
        pass


_seq = itertools.count(1)


def request(sock: socket.socket, msg_type: int, res_id: int, attrs: bytes, what: str, other=None) -> None:
    """Send one acknowledged request (a queue's or log group's configuration) and wait for it."""
    sock.send(message(msg_type, NLM_F_REQUEST | NLM_F_ACK, next(_seq), 0, res_id, attrs))
    wait_acks(sock, 1, what, other=other)


def wait_acks(sock: socket.socket, count: int, what: str, timeout: float = 5.0, other=None) -> None:
    """Read until ``count`` acks arrived; raise OSError with the kernel's errno on a refusal.
    Works on blocking and non-blocking sockets alike (the loop's sockets are non-blocking).
    ``other(data, msg_type, start, end)`` is given every other message read meanwhile (a
    queue's held packets arrive on the socket its configuration is acknowledged on)."""
    while count > 0:
        if not select.select([sock], [], [], timeout)[0]:
            raise OSError(errno.ETIMEDOUT, f"{what}: no answer from the kernel within {timeout:g} s")
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        for msg_type, start, end in messages(data):
            if msg_type == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, start)
                if code:
                    raise OSError(-code, f"{what}: {errno.errorcode.get(-code, code)}")
                count -= 1
            elif other is not None:
                other(data, msg_type, start, end)


def bind_group(kind, number: int, what: str, setting: str):
    """A queue or log group of our own; ResourceBusy naming the fix when another program
    (Suricata, ulogd, a second ramfw) holds it."""
    try:
        return kind(number)
    except OSError as err:
        raise ResourceBusy(f"cannot bind {what} {number}: {err.strerror or err}; another program (Suricata, "
                           f"ulogd, ...) may hold it: set {setting} in the configuration to a free number") from None
