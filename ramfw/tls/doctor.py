"""What ``ramfw doctor`` and ``status`` say of the TLS server name check (``daemon.sni``):
whether it can run here, what it costs, and whether another table's rules would undo it."""

from __future__ import annotations

UNDONE = ("a flow whose bit it clears passes on its address alone and one whose bit it sets is reset (make that "
          "rule leave those bits, or move enforcement.tls_ct_mark to a free bit)")


def writers_text(writers: list, mask: int) -> str:
    """Status's words, one line, for other tables' rules that may change the check's mark bits."""
    named = "; ".join(map(str, writers[:3])) + (f"; and {len(writers) - 3} more" if len(writers) > 3 else "")
    return (f"another table may change the conntrack mark bits the check keeps a flow's state in ({mask:#x}): "
            f"{named}; while it is there, {UNDONE}")


def doctor_text(settings, report, writers: list) -> str:
    """What ``ramfw doctor`` says of the check: whether it can be active here, its cost, and
    whether another table's rules (``writers``, ``kernel.ctmarks``) would undo it."""
    ports = ", ".join(map(str, settings.tls_ports))
    if not settings.tls_check:
        return ("TLS server names: NOT checked (enforcement.tls_check = false): an address learned for an allowed "
                "name is open to every name served there")
    if not report.hold.holds:
        return ("TLS server names: NOT checkable here (no netfilter queue): flows to learned addresses pass on their "
                "address alone; QUIC to the TLS ports is still refused")
    mask = settings.tls_mark_mask
    marks = (f"TLS server names may NOT be checked: rules of other tables may change the conntrack mark bits the "
             f"check keeps a flow's state in ({mask:#x}); while one is there, {UNDONE}:"
             + "".join(f"\n  {writer}" for writer in writers) if writers else
             f"TLS server names: no other table writes the check's conntrack mark bits ({mask:#x})")
    return (f"TLS server names: checked by a running daemon on TCP ports {ports} (queue "
            f"{settings.tls_queue_num}): each new connection to a learned address has its SYN copied and its first "
            "data segments (the ClientHello, 1 to 3 of them) held until read, about 0.1 ms more to its first byte "
            "(docs/benchmarks.md); once judged, none of its packets reach userspace; QUIC to those ports is refused; "
            f"with no daemon running, such flows pass on their address alone\n{marks}")
