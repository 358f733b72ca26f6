"""nf_tables messages built as raw netlink: what libnftables' JSON cannot express, or would
make too slow on the hold path. Pure: bytes out (and, for dumps, bytes in); ``table`` sends them.

- The DNS hold rules. libnftables can render a native ``queue`` rule, but not the xt NFQUEUE
  target (nft compat), which is all some kernels have (this lab's, for one), nor the xt ``bpf``
  match that runs the DNS prefilter (``prefilter``)::

      tcp sport 53                         -> queue (DNS over TCP is always held: it is reassembled)
      udp sport 53  [bpf prefilter match]  -> queue
      udp sport 53  (prefilter only)       -> log to the snoop group (a copy, not held)

  or, where nothing can hold (``Hold.PASSIVE``), tcp and udp sport 53 -> log to the snoop group.
  The queue is the xt NFQUEUE target or the native queue expression, both with bypass. Those
  are the input and forward hooks' (``dns_input``, ``dns_forward``); the output and forward
  hooks' (``dns_output``, ``dns_forward``) copy the UDP queries the replies are paired with::

      udp dport 53  [bpf prefilter match]  -> log to the snoop group

  or, where the prefilter pairs them in the kernel, record them and copy nothing (the reply
  rule's program is then the one that holds only a reply that answers a recorded query)::

      udp dport 53  [bpf pairing match, which records the query and never matches]
- The allowed sets' elements: a reply waits while they are programmed, so they skip the JSON
  round trip; and their dump, streamed (a JSON listing of 100,000 elements costs hundreds of MB).
"""

from __future__ import annotations

import socket
import struct
from typing import Iterable, Iterator

from ..snoop.snooper import Element
from . import netlink as nl
from .netlink import attr, nested, string, u32
from .ruleset import ALLOW, PENDING, RESOLVERS, TLS_QUEUE, UNSOLICITED, Hold, Learned

XT_BPF_MODE_FD_ELF = 2
XT_BPF_INFO_V1_SIZE = 528  # mode, count, fd, a 512-byte union, the kernel's pointer
ELEMENTS_BYTES = 60 << 10  # one transaction's elements, all its messages together (see below)


def _expr(name: str, *data: bytes) -> bytes:
    return nested(nl.NFTA_LIST_ELEM, string(nl.NFTA_EXPR_NAME, name), nested(nl.NFTA_EXPR_DATA, *data))


def _cmp_eq(value: bytes, op: int = nl.NFT_CMP_EQ) -> bytes:
    return _expr("cmp", u32(1, nl.NFT_REG_1), u32(2, op), nested(3, attr(1, value)))


_ACCEPT = _expr("immediate", u32(1, nl.NFT_REG_VERDICT), nested(2, nested(2, u32(1, nl.NF_ACCEPT_VERDICT))))
_COUNT_UNSOLICITED = _expr("objref", u32(1, nl.NFT_OBJECT_COUNTER), string(2, UNSOLICITED))

# What makes a reply unsolicited, each on its own (a rule matches a conjunction, so their
# negations are three rules): not part of a tracked flow; a flow the peer opened (its side is
# the original direction: it sent first); a source address that would not be routed back out
# of the interface it came in on (forged: the reverse-path check, IPv4 and IPv6 alike, which
# also keeps loopback sources to lo).
_UNSOLICITED = (
    [_expr("ct", u32(1, nl.NFT_REG_1), u32(2, nl.NFT_CT_STATE)),
     _expr("bitwise", u32(1, nl.NFT_REG_1), u32(2, nl.NFT_REG_1), u32(3, 4),
           nested(4, attr(1, struct.pack("=I", nl.CT_STATE_ESTABLISHED))), nested(5, attr(1, b"\0" * 4))),
     _cmp_eq(b"\0" * 4)],
    [_expr("ct", u32(1, nl.NFT_REG_1), u32(2, nl.NFT_CT_DIRECTION)), _cmp_eq(bytes([nl.CT_DIR_REPLY]), nl.NFT_CMP_NEQ)],
    [_expr("fib", u32(1, nl.NFT_REG_1), u32(2, nl.NFT_FIB_RESULT_OIF),
           u32(3, nl.NFTA_FIB_F_SADDR | nl.NFTA_FIB_F_IIF | nl.NFTA_FIB_F_PRESENT)), _cmp_eq(b"\0")],
)


def _unsolicited_rules() -> list[bytes]:
    """Replies that answer no query this VM (or a container it forwards for) sent to that
    resolver are counted and pass unread: they teach nothing."""
    return [b"".join(_from_dns(proto) + test + [_COUNT_UNSOLICITED, _ACCEPT])
            for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) for test in _UNSOLICITED]


def _from_dns(l4proto: int, to_dns: bool = False) -> list[bytes]:
    """meta l4proto == l4proto; th sport == 53 (``to_dns``: th dport == 53)."""
    return [
        _expr("meta", u32(2, nl.NFT_META_L4PROTO), u32(1, nl.NFT_REG_1)),
        _cmp_eq(bytes([l4proto])),
        _expr("payload", u32(1, nl.NFT_REG_1), u32(2, nl.NFT_PAYLOAD_TRANSPORT_HEADER), u32(3, 2 if to_dns else 0),
              u32(4, 2)),
        _cmp_eq(struct.pack("!H", 53)),
    ]


def bpf_match(prog_fd: int) -> bytes:
    """xt bpf match, revision 1, the program given by file descriptor (struct xt_bpf_info_v1)."""
    info = struct.pack("=HHi", XT_BPF_MODE_FD_ELF, 0, prog_fd).ljust(XT_BPF_INFO_V1_SIZE, b"\0")
    return _expr("match", string(1, "bpf"), u32(2, 1), attr(3, info))


def _queue(queue_num: int, native: bool) -> bytes:
    if native:
        return _expr("queue", attr(1, struct.pack("!H", queue_num)), attr(2, struct.pack("!H", 1)),
                     attr(3, struct.pack("!H", nl.NFQ_FLAG_BYPASS)))
    # struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; } (host order)
    return _expr("target", string(1, "NFQUEUE"), u32(2, 3),
                 attr(3, struct.pack("=HHH", queue_num, 1, nl.NFQ_FLAG_BYPASS) + b"\0\0"))


def _log(group: int) -> bytes:
    return _expr("log", attr(1, struct.pack("!H", group)))


def hold_rules(hold: Hold, queue_num: int, prefilter_fd: int | None, snoop_group: int) -> list[bytes]:
    """The expressions of each DNS hold rule, in order (see the module's docstring)."""
    tcp, udp = socket.IPPROTO_TCP, socket.IPPROTO_UDP
    if hold is Hold.PASSIVE:
        return _unsolicited_rules() + [b"".join(_from_dns(proto) + [_log(snoop_group)]) for proto in (tcp, udp)]
    if hold is Hold.NONE:
        return []
    queue = _queue(queue_num, native=hold is Hold.NFT_QUEUE)
    rules = _unsolicited_rules() + [b"".join(_from_dns(tcp) + [queue])]
    if prefilter_fd is None:
        rules.append(b"".join(_from_dns(udp) + [queue]))
    else:
        rules.append(b"".join(_from_dns(udp) + [bpf_match(prefilter_fd), queue]))
        rules.append(b"".join(_from_dns(udp) + [_log(snoop_group)]))
    return rules


def query_rules(prefilter_fd: int | None, snoop_group: int | None) -> list[bytes]:
    """UDP queries to a trusted resolver, copied to the snoop group for the daemon to pair
    replies with; where the prefilter runs, only those that may be for an allowlisted name (it
    reads a query's question as it reads a reply's). Queries to any other address are not
    copied: a local user's flood of them must not bury the real queries' copies. With no
    ``snoop_group``, nothing is copied: ``prefilter_fd`` is the kernel's pairing program,
    which records the query itself."""
    udp = _from_dns(socket.IPPROTO_UDP, to_dns=True)
    rules = []
    for version, (family, offset, length) in ((4, (nl.NFPROTO["ip"], 16, 4)), (6, (nl.NFPROTO["ip6"], 24, 16))):
        to_resolver = [
            _expr("meta", u32(2, nl.NFT_META_NFPROTO), u32(1, nl.NFT_REG_1)),
            _cmp_eq(bytes([family])),
            _expr("payload", u32(1, nl.NFT_REG_1), u32(2, nl.NFT_PAYLOAD_NETWORK_HEADER), u32(3, offset),
                  u32(4, length)),
            _expr("lookup", string(nl.NFTA_LOOKUP_SET, RESOLVERS[version]), u32(nl.NFTA_LOOKUP_SREG, nl.NFT_REG_1)),
        ]
        prefilter = [bpf_match(prefilter_fd)] if prefilter_fd is not None else []
        rules.append(b"".join(udp + to_resolver + prefilter + ([_log(snoop_group)] if snoop_group is not None else [])))
    return rules


def dns_chain_rules(hold: Hold, queue_num: int, prefilter_fd: int | None, snoop_group: int,
                    pair_queries: bool = True, pairing_fd: int | None = None) -> dict[str, list[bytes]]:
    """Each DNS chain's rules (``ruleset.DNS_CHAINS``): replies held (or copied) where they come
    in, queries copied where they go out (``pair_queries``), or recorded in the kernel by the
    query side of the prefilter's pairing (``pairing_fd``; ``prefilter_fd`` is then its reply
    side); nothing without a daemon (``Hold.NONE``)."""
    if hold is Hold.NONE:
        return {}
    replies = hold_rules(hold, queue_num, prefilter_fd, snoop_group)
    if pairing_fd is not None:
        queries = query_rules(pairing_fd, None)
    else:
        queries = query_rules(prefilter_fd, snoop_group) if pair_queries else []
    return {"dns_input": replies, "dns_forward": queries + replies, "dns_output": queries}


def tls_queue_rules(hold: Hold, queue_num: int) -> dict[str, list[bytes]]:
    """The ``tls_queue`` chain's one rule: to the queue the TLS check reads, with bypass (no
    daemon bound: the flow passes on its address, as before the check existed), never failing
    open when the queue is full (the kernel drops; the client sends the segment again)."""
    if not hold.holds:
        return {}
    return {TLS_QUEUE: [_queue(queue_num, native=hold is Hold.NFT_QUEUE)]}


def own_traffic_rules(cgroup_id: int, level: int) -> list[bytes]:
    """``socket cgroupv2 level <level> == <cgroup_id> accept``: ramfw's own connections (policy
    polls) pass host scope. The cgroup is named by id, not path: nft resolves paths under
    /sys/fs/cgroup only, which is not where hybrid layouts mount cgroup v2. Joining a cgroup
    takes root, so no ordinary process can borrow the exemption (a socket mark could be set by
    any process with CAP_NET_RAW)."""
    return [b"".join([_expr("socket", u32(1, nl.NFT_SOCKET_CGROUPV2), u32(2, nl.NFT_REG_1), u32(3, level)),
                      _cmp_eq(struct.pack("=Q", cgroup_id)), _ACCEPT])]


def build_rules_batch(family: str, table: str, chain: str, rules: list[bytes], seq: int = 1,
                      replace: bool = False) -> bytes:
    """One transaction appending ``rules`` to ``chain`` (``rules_steps``)."""
    return nl.batch(rules_steps(family, table, chain, rules, replace), seq)


def rules_steps(family: str, table: str, chain: str, rules: list[bytes], replace: bool = False) -> list:
    """The steps appending ``rules`` to ``chain``; with ``replace``, the chain's old rules are
    deleted in the same transaction (a rule deletion naming only the chain). Every step asks
    for an ack, so the sender can wait for the kernel's answer to each."""
    where = string(nl.NFTA_RULE_TABLE, table) + string(nl.NFTA_RULE_CHAIN, chain)
    steps = [(nl.NFT_MSG_DELRULE, nl.NLM_F_ACK, nl.NFPROTO[family], where)] if replace else []
    for expressions in rules:
        steps.append((nl.NFT_MSG_NEWRULE, nl.NLM_F_CREATE | nl.NLM_F_APPEND | nl.NLM_F_ACK, nl.NFPROTO[family],
                      where + nested(nl.NFTA_RULE_EXPRESSIONS, expressions)))
    return steps


def address_key(address: str) -> bytes:
    """A set element's key attribute for an IPv4 or IPv6 address."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    return nested(nl.NFTA_SET_ELEM_KEY, attr(nl.NFTA_DATA_VALUE, packed))


def ifname_key(name: str) -> bytes:
    """A set element's key attribute for an interface name (nft's ifname: 16 bytes, zero-padded)."""
    return nested(nl.NFTA_SET_ELEM_KEY, attr(nl.NFTA_DATA_VALUE, name.encode()[:15].ljust(16, b"\0")))


def element_attrs(element: Element) -> bytes:
    """A learned element: its address, its timeout and expiration, its host name as the
    element's comment. The expiration too: a kernel that updates an existing element (6.10+)
    re-arms it only when asked to; given the same timeout alone it keeps the old expiry (the
    soak benchmark found it)."""
    millis = struct.pack("!Q", element.timeout * 1000)
    attrs = address_key(element.address) + attr(nl.NFTA_SET_ELEM_TIMEOUT, millis) + attr(nl.NFTA_SET_ELEM_EXPIRATION, millis)
    if element.name:
        comment = element.name[:127].encode() + b"\0"
        attrs += attr(nl.NFTA_SET_ELEM_USERDATA, bytes([nl.NFTNL_UDATA_SET_ELEM_COMMENT, len(comment)]) + comment)
    return attrs


def _element(element: Element, with_data: bool) -> bytes:
    return nested(nl.NFTA_LIST_ELEM, element_attrs(element) if with_data else address_key(element.address))


def _set_ref(table: str, set_name: str) -> bytes:
    return string(nl.NFTA_SET_ELEM_LIST_TABLE, table) + string(nl.NFTA_SET_ELEM_LIST_SET, set_name)


def build_elements_batches(table: str, elements: Iterable[Element], kernel_refreshes_timeout: bool,
                           clear_pending: bool = False) -> list[bytes]:
    """Add (or re-arm) elements: one transaction per datagram, as many as the elements need.

    A netlink attribute's length is 16 bits, so one message's element list must stay under
    64 KiB, and a reply can bring far more: 1000 AAAA with 127-character comments are 176 KiB.
    The elements are cut into chunks whose messages, all together, stay under
    ``ELEMENTS_BYTES``: every attribute fits, and every datagram stays far below the socket's
    send buffer. Each address's steps share one transaction. The kernel commits each
    transaction inside ``send``, so all of a reply's are committed before it is released.

    Kernels that do not re-arm a timeout when an element is added again
    (``kernel_refreshes_timeout`` false) get add, delete, add: the first add makes the delete
    safe, the last sets the new timeout, and since it is one transaction no packet sees the
    address missing. ``clear_pending`` (passive hold) also takes the addresses out of the
    pending sets, so their next first SYN is deferred again.
    """
    copies = (0 if kernel_refreshes_timeout else 2) + (2 if clear_pending else 0)
    batches: list[bytes] = []
    chunk: dict[int, tuple[list[bytes], list[bytes]]] = {4: ([], []), 6: ([], [])}
    size = 0
    for element in elements:
        bare, full = _element(element, False), _element(element, True)
        cost = len(full) + copies * len(bare)
        if size and size + cost > ELEMENTS_BYTES:
            batches.append(_elements_batch(table, chunk, kernel_refreshes_timeout, clear_pending))
            chunk, size = {4: ([], []), 6: ([], [])}, 0
        bares, fulls = chunk[6 if ":" in element.address else 4]
        bares.append(bare)
        fulls.append(full)
        size += cost
    if size:
        batches.append(_elements_batch(table, chunk, kernel_refreshes_timeout, clear_pending))
    return batches


def _elements_batch(table: str, chunk: dict[int, tuple[list[bytes], list[bytes]]],
                    kernel_refreshes_timeout: bool, clear_pending: bool) -> bytes:
    steps = []
    inet = nl.NFPROTO["inet"]
    for version, (bares, fulls) in chunk.items():
        if not fulls:
            continue
        bare = nested(nl.NFTA_SET_ELEM_LIST_ELEMENTS, *bares)
        allow = _set_ref(table, ALLOW[version])
        if not kernel_refreshes_timeout:
            steps += [(nl.NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE, inet, allow + bare),
                      (nl.NFT_MSG_DELSETELEM, 0, inet, allow + bare)]
        steps.append((nl.NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE, inet,
                      allow + nested(nl.NFTA_SET_ELEM_LIST_ELEMENTS, *fulls)))
        if clear_pending:
            pending = _set_ref(table, PENDING[version]) + bare
            steps += [(nl.NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE, inet, pending),
                      (nl.NFT_MSG_DELSETELEM, 0, inet, pending)]
    return nl.batch(steps)


def build_elements_dump(table: str, set_name: str, seq: int) -> bytes:
    return nl.message((nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_GETSETELEM, nl.NLM_F_REQUEST | nl.NLM_F_DUMP,
                      seq, nl.NFPROTO["inet"], 0, _set_ref(table, set_name))


def parse_elements_dump(data: bytes, family: int) -> tuple[list[Learned], bool]:
    """The elements in one datagram of a set-element dump, and whether the dump ended."""
    found = []
    for msg_type, start, end in nl.messages(data):
        if msg_type in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
            return found, True
        attrs = nl.parse_attrs(data, start + nl.NFGEN.size, end)
        for _, elem in nl.iter_attrs(attrs.get(nl.NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
            e = nl.parse_attrs(elem)
            key = nl.parse_attrs(e.get(nl.NFTA_SET_ELEM_KEY, b"")).get(nl.NFTA_DATA_VALUE, b"")
            try:
                address = socket.inet_ntop(family, key)
            except (ValueError, OSError):
                continue
            timeout = _millis(e.get(nl.NFTA_SET_ELEM_TIMEOUT))
            expires = _millis(e.get(nl.NFTA_SET_ELEM_EXPIRATION))
            udata = e.get(nl.NFTA_SET_ELEM_USERDATA, b"")
            name = ""
            if len(udata) >= 2 and udata[0] == nl.NFTNL_UDATA_SET_ELEM_COMMENT:
                name = udata[2 : 2 + udata[1]].rstrip(b"\0").decode(errors="replace")
            found.append(Learned(address, expires, timeout, name))
    return found, False


def _millis(value: bytes | None) -> int:
    return struct.unpack("!Q", value)[0] // 1000 if value is not None and len(value) == 8 else 0


def dump_all(sock: socket.socket, table: str) -> Iterator[Learned]:
    """Stream the allowed sets' elements over ``sock`` (a fresh netfilter netlink socket)."""
    for version, set_name in ALLOW.items():
        sock.send(build_elements_dump(table, set_name, version))
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        done = False
        while not done:
            found, done = parse_elements_dump(sock.recv(1 << 20), family)
            yield from found
