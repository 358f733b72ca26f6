"""The first flight of a TLS connection, read before it leaves: pure, no I/O (the pure core).

- ``hello``   the ClientHello record: its server name, or why it cannot be checked; an HTTP
              proxy's ``CONNECT host:port`` request
- ``stream``  a flow's client bytes put back in order from TCP segments, bounded, overlaps
              that disagree refused; what the first flight says once it is whole
- ``judge``   a server name against the allowlist and the names the address was learned for

Imports nothing from ``ramfw.kernel`` or ``ramfw.daemon``.
"""
