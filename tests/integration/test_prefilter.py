"""The eBPF DNS prefilter, run by the kernel on real packets (BPF_PROG_TEST_RUN)."""

import os

import pytest

from ramfw.kernel import bpf
from ramfw.policy.names import Pattern, parse_entry
from tests.support.packets import reply, udp, udp6

HOLD, PASS = 1, 0


@pytest.fixture
def prefilter():
    if os.geteuid() != 0:
        pytest.skip("loading eBPF needs root")
    from ramfw.kernel.prefilter import Prefilter

    try:
        f = Prefilter()
    except OSError as err:
        pytest.skip(f"the prefilter does not load on this kernel: {err}")
    try:
        f.update(parse_entry(e).pattern for e in ("ghcr.io", "*.blob.core.windows.net", "registry", "Docker.IO"))
        yield f
    finally:
        f.close()


def verdict(f, name, v6=False):
    packet = (udp6 if v6 else udp)(reply(name, f"{name}. 60 A 192.0.2.1"))
    return bpf.test_run(f.prog_fd, packet)


@pytest.mark.parametrize("name, expected", [
    ("ghcr.io", HOLD), ("GHCR.IO", HOLD), ("pkg.ghcr.io", HOLD),
    ("x.blob.core.windows.net", HOLD), ("registry-1.docker.io", HOLD), ("registry", HOLD), ("a.registry", HOLD),
    ("github.com", PASS), ("pypi.org", PASS), ("badghcr.io", PASS), ("ghcr.io.evil.test", PASS),
])
def test_only_names_that_may_be_allowlisted_are_held(prefilter, name, expected):
    assert verdict(prefilter, name) == expected
    assert verdict(prefilter, name, v6=True) == expected


def test_what_it_cannot_follow_is_held_and_garbage_is_not(prefilter):
    pointer = udp(b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01")
    assert bpf.test_run(prefilter.prog_fd, pointer) == HOLD
    assert bpf.test_run(prefilter.prog_fd, udp(b"\x00" * 5)) == PASS


def test_the_map_follows_policy_updates(prefilter):
    assert verdict(prefilter, "quay.io") == PASS
    prefilter.update([Pattern("quay.io")])
    assert verdict(prefilter, "cdn.quay.io") == HOLD and verdict(prefilter, "ghcr.io") == PASS
    prefilter.update([])
    assert verdict(prefilter, "quay.io") == PASS and prefilter.keys == set()
