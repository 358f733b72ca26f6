"""The kernel layer: one module per kernel object ramfw creates, and the primitives they share.

``netlink`` (nfnetlink primitives and constants), ``ruleset`` (the table as JSON, pure),
``nft`` (nf_tables netlink messages, pure), ``table`` (the only writer of ``inet ramfw``),
``queue`` (the packet queue), ``nflog`` (NFLOG groups), ``bpf`` (the bpf() primitives),
``engine`` (the engine-mark program and its cgroup), ``prefilter`` (the DNS prefilter),
``probes`` (what this kernel can do).
"""
