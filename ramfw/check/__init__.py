"""``ramfw check IMAGE...``: which hosts a pull would touch, and whether each is allowed.

A pull fails late and far from its cause: the registry is allowed, but its blobs redirect to a
CDN that is not, and the engine says only "connection refused". ``check`` speaks the registry
protocol as the engine would (``probe``), then judges every host it saw, and the ones the
registry profiles name for what it could not see, against the policy in force and the
kernel's allowed sets (``verdict``), and names the exact entries to add.

``reference`` parses image references as the engine does; ``credentials`` reads the engine's
stored logins. Only ``probe`` touches the network; nothing here touches the kernel (``api``
reads the allowed sets and hands them in).
"""
