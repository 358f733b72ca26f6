"""The container bridges of this network namespace, read over rtnetlink (not /sys: a daemon
entered into a namespace with ``nsenter --net`` sees the host's /sys/class/net).

A container bridge is a bridge whose every port is a veth whose other end is in another
network namespace (a container's), or a tap: what Docker, containerd and Podman make (docker0,
br-<id>, cni0). Traffic routed onto one stays on this VM, reaching a container: it is not
egress, so ramfw lets it pass (``docker run -p`` through docker-proxy, a registry container on
``localhost:5000``). A bridge with any other port (a NIC, a VLAN, a bond, a veth whose other end
is here and may be a port of another bridge) may carry traffic off the VM, and is not one.
"""

from __future__ import annotations

import socket
import struct

from . import netlink as nl

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTMGRP_LINK = 1
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID = 3, 10, 18, 37
NLM_F_DUMP_INTR = 0x10
IFLA_INFO_KIND = 1
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
PORT_KINDS = {"veth", "tun"}  # a container's end, a VM's tap


def _links(data: bytes) -> list[tuple[int, str, str, int]]:
    """(index, name, kind, master index) of each link in a dump's datagram; a veth whose other
    end is in this namespace has the kind ``veth-here``. OSError if the kernel reports an error
    or an interrupted dump (the list would be incomplete: a bridge could look all-container)."""
    found = []
    for msg_type, start, end in nl.messages(data):
        flags = nl.HEADER.unpack_from(data, start - nl.HEADER.size)[2]
        if flags & NLM_F_DUMP_INTR:
            raise OSError(4, "the link dump was interrupted by a change")
        if msg_type == nl.NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, start)
            if code:
                raise OSError(-code, "the link dump failed")
        if msg_type != RTM_NEWLINK or start + IFINFOMSG.size > end:
            continue
        index = IFINFOMSG.unpack_from(data, start)[2]
        attrs = nl.parse_attrs(data, start + IFINFOMSG.size, end)
        name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
        info = nl.parse_attrs(attrs.get(IFLA_LINKINFO, b""))
        kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode(errors="replace")
        master = struct.unpack("=I", attrs[IFLA_MASTER])[0] if len(attrs.get(IFLA_MASTER, b"")) == 4 else 0
        if kind == "veth" and IFLA_LINK_NETNSID not in attrs:
            kind = "veth-here"
        found.append((index, name, kind, master))
    return found


def dump(attempts: int = 3) -> list[tuple[int, str, str, int]]:
    """Every link of this namespace; an interrupted dump is made again."""
    for attempt in range(attempts):
        try:
            return _dump()
        except InterruptedError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _dump() -> list[tuple[int, str, str, int]]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(nl.HEADER.pack(nl.HEADER.size + len(body), RTM_GETLINK, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 1, 0)
                  + body)
        links = []
        while True:
            data = sock.recv(1 << 16)
            links += _links(data)
            if any(msg_type in (nl.NLMSG_DONE, nl.NLMSG_ERROR) for msg_type, _, _ in nl.messages(data)):
                return links


def container_bridges(links: list[tuple[int, str, str, int]]) -> list[str]:
    """The bridges whose ports are all veths or taps."""
    bridges = {index: name for index, name, kind, _ in links if kind == "bridge"}
    foreign = {master for _, _, kind, master in links if master in bridges and kind not in PORT_KINDS}
    return sorted(name for index, name in bridges.items() if index not in foreign)


class LinkWatch:
    """Link changes of this namespace (a bridge made, a port added): the daemon reads the
    container bridges again at once."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setblocking(False)
        self.sock.bind((0, RTMGRP_LINK))

    def drain(self) -> None:
        nl.drain(self.sock)

    def close(self) -> None:
        self.sock.close()
