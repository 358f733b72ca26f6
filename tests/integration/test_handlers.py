"""Every socket the daemon's loop reads returns at once when nothing waits (no handler blocks)."""

import threading

from ramfw.kernel import nflog
from ramfw.kernel.queue import Queue


def _returns_at_once(reader) -> list:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(reader.receive()), daemon=True)
    thread.start()
    thread.join(1.0)
    if thread.is_alive():
        reader.sock.close()  # unblocks nothing, but keeps close() from waiting on a stolen ack
        raise AssertionError("receive() blocked on an empty socket")
    reader.close()
    return result[0]


def test_an_empty_queue_and_empty_log_groups_return_nothing_at_once(lab):
    with lab.vm.inside():
        queue, log = Queue(7001), nflog.Log(7002)
    assert _returns_at_once(queue) == []
    assert _returns_at_once(log) == []
