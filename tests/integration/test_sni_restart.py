"""The TLS check across a daemon restart (review of issue #13): a connection the old daemon was
reading, or had let through but not yet seen the server take, must not come out of the restart
unchecked; one that sent its first flight while no daemon ran keeps passing (test_sni.py)."""

import signal
import time

import pytest

from tests.integration.test_sni import (ALLOWED, OTHER, client, greeting, raw_flow, send_with_md5_option, start_edge,
                                        status)
from tests.support import tls


@pytest.fixture
def edge_lab(lab, write_config, write_policy, tmp_path):
    return start_edge(lab, write_config, write_policy, tmp_path)


def restart(lab, how):
    lab.daemon.send_signal(how)
    lab.daemon.wait(10)
    lab.daemon = lab.start_daemon(lab.config)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_connection_idle_across_a_restart_cannot_then_send_another_name(edge_lab, how):
    """Its SYN was seen by the old daemon; it sends nothing until the new one runs. Its mark was
    cleared at start, as if it had passed while no daemon ran, and the other name went through."""
    lab = edge_lab
    idle = client(lab)
    time.sleep(0.2)  # the old daemon read its SYN's copy
    restart(lab, how)
    assert greeting(idle, OTHER) == "reset"
    assert greeting(client(lab), ALLOWED) == f"hello from {ALLOWED}", "new connections are read as ever"


def test_a_first_flight_not_yet_taken_by_the_server_at_a_restart_is_refused(edge_lab):
    """A cover ClientHello for the allowed name that the server drops (a TCP MD5 option): the
    old daemon let it through and waits for the server's acknowledgment. Cleared at the restart,
    the flow could send the other name at the same place after it."""
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    flow = raw_flow(lab)
    try:
        send_with_md5_option(flow, allowed)
        time.sleep(0.2)
        restart(lab, signal.SIGTERM)
        flow.send(0, other)
        assert flow.outcome() in ("nothing", "reset") and OTHER not in lab.edge.asked, lab.edge.asked
    finally:
        flow.close()
    assert "unchecked_at_start" not in status(lab)["tls"]["counters"]


def test_in_audit_mode_a_connection_idle_across_a_restart_passes(lab, write_config, write_policy, tmp_path):
    """Audit mode refuses nothing: a stopping daemon lets the flows it was reading pass unread."""
    lab = start_edge(lab, write_config, write_policy, tmp_path, mode="audit")
    idle = client(lab)
    time.sleep(0.2)
    restart(lab, signal.SIGTERM)
    assert greeting(idle, OTHER) == f"hello from {OTHER}"
