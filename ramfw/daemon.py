"""The root daemon: holds DNS replies, programs the allowed sets, names what it blocks.

One thread, one ``selectors`` loop: the queue socket, the NFLOG sockets (blocked
connections; copies of replies not held), the control sockets and a wake-up socket for
signals. A held reply is read, decided (``dnsreply``), its addresses programmed, and only then
released. Where the kernel allows, an eBPF prefilter (``dnsfilter``) holds only the replies
that may be for allowlisted names; the others reach the daemon as copies, for counters and
block messages. SIGHUP or ``ramfw reload`` re-reads the policy; SIGTERM exits and leaves
enforcement in place. Only ``ramfw down`` removes it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path

from . import api, dnsreply, holdrules, nflog, probes, resolvers, ruleset
from .config import Config
from .errors import DaemonError, NftablesError, RamfwError
from .queue import NF_ACCEPT, NF_DROP, Queue

log = logging.getLogger("ramfw")
HOUSEKEEPING = 1.0
BURST = 64  # datagrams one handler reads before the loop looks at the other sockets


class Daemon:
    def __init__(self, config: Config, policy_path: str | None = None):
        self.config = config
        self.policy_path = policy_path
        self.stopping = False
        self.reload_requested = False
        self.recent_blocks: deque[dict] = deque(maxlen=50)
        self.errors: deque[str] = deque(maxlen=20)
        self.queue: Queue | None = None
        self.snoop: nflog.Log | None = None
        self.blocks: nflog.Log | None = None
        self.control: socket.socket | None = None
        self.lock: socket.socket | None = None
        self.started = time.time()
        self._poll_now = threading.Event()
        self._logged_blocks: dict[str, tuple[float, int]] = {}

    # -- start-up --------------------------------------------------------------------------
    def start(self) -> None:
        api.require_root("ramfw daemon")
        self._take_lock()  # first: a second daemon in this namespace stops before touching anything
        self.url_source = api.url_source(self.config) if self.policy_path is None else None
        if self.url_source is not None:
            self.url_source.refresh()
        self.policy, self.source = api.load_policy(self.config, self.policy_path, fallback=True)
        self.policy_loaded = time.time()
        self.report = probes.run()
        api.check_capabilities(self.report)
        self.hold = "passive" if self.config.dns.hold == "passive" else self.report.queue_mechanism
        self.table = ruleset.Table(self.config.enforcement.table)
        self.resolv_mtime = _mtime(resolvers.RESOLV_CONF)
        self.trusted = resolvers.trusted(self.config.dns.trusted_resolvers)
        self.snooper = dnsreply.Snooper(self.policy, set(self.trusted), self.config.dns)
        # Bind the queue before the rules exist, so no reply passes (bypass) in between.
        self.prefilter = None
        if self.hold in ("nft-queue", "xt-nfqueue"):
            self.queue = Queue(self.config.dns.queue_num)
            if self.config.dns.prefilter and self.report.has("dns_prefilter"):
                from .dnsfilter import DnsFilter

                self.prefilter = DnsFilter()
                self.prefilter.update(self.policy.patterns())
        if self.hold == "passive" or self.prefilter is not None:
            self.snoop = nflog.Log(self.config.dns.snoop_group)
        if self.report.has("nflog"):
            self.blocks = nflog.Log(self.config.enforcement.nflog_group)
        self.apply()
        self.engine_state: dict = {}
        self._attach_engine()
        self._seed_from_kernel()
        dnsreply.warm_up()
        self._open_control()
        log.info("ramfw daemon enforcing %s (%d entries, %s mode, DNS hold: %s)",
                 self.policy.organization, len(self.policy.matcher), self.config.enforcement.mode, self.hold)
        if self.hold == "passive":
            log.warning("this kernel cannot hold DNS replies: the first connection to a new address can be lost")

    def apply(self) -> None:
        """Apply the whole ruleset, with the DNS hold this kernel allows."""
        e, d = self.config.enforcement, self.config.dns
        if not self.policy.enabled:
            self.table.remove()
        else:
            in_netlink = self.hold == "xt-nfqueue" or (self.hold == "nft-queue" and self.prefilter is not None)
            self.table.apply(ruleset.build_ruleset(e, self.trusted, d.max_addresses,
                                                   "netlink" if in_netlink else self.hold, d.queue_num, d.snoop_group))
            if in_netlink:
                rules = holdrules.hold_rules(d.queue_num, self.hold == "nft-queue",
                                           self.prefilter.prog_fd if self.prefilter else None, d.snoop_group)
                for chain in ruleset.DNS_CHAINS:
                    try:
                        holdrules.add_rules(ruleset.FAMILY, e.table, chain, rules, replace=True)
                    except OSError as err:
                        raise NftablesError(f"cannot add the DNS hold rules: {err.strerror}") from None
        api.write_record(self.config, self._record())

    def _attach_engine(self) -> None:
        """Engine scope: mark the engine's sockets with the sock_create program."""
        e = self.config.enforcement
        if "engine" not in e.scope or self.engine_state.get("attached"):
            return
        loader = "bcc" if self.report.has("bcc") else "hand-assembled (no compiler needed)"
        if not self.report.has("cgroup_bpf"):
            self.engine_state = {"attached": False, "loader": loader,
                                 "note": "engine scope is unavailable on this kernel: cgroup eBPF is missing; "
                                         "use scope host"}
            return
        from . import bpf, engine

        found = engine.locate(bpf.cgroup2_mount(), e.engine_cgroup, e.engine_processes, e.dedicated_cgroup)
        if found is None:
            self.engine_state = {"attached": False, "loader": loader,
                                 "note": f"no engine process ({', '.join(e.engine_processes)}) found yet; "
                                         "looking again every few seconds"}
            return
        if found.note and found.path == bpf.cgroup2_mount():
            self.engine_state = {"attached": False, "loader": loader, "cgroup": found.path, "note": found.note}
            return
        try:
            self._engine_mark(found.path).apply()
        except OSError as err:
            self.engine_state = {"attached": False, "loader": loader, "cgroup": found.path,
                                 "note": f"cannot attach the engine-scope program: {err}"}
            self._error(self.engine_state["note"])
            return
        self.engine_state = {"attached": True, "loader": loader, "cgroup": found.path, "note": found.note}
        log.info("engine scope: marking sockets of cgroup %s (%s)", found.path, loader)

    def _engine_mark(self, cgroup: str):
        from . import bpf

        return bpf.EngineMark(cgroup, self.config.enforcement.mark, Path(self.config.enforcement.bpffs),
                              Path(self.config.daemon.run_dir) / "engine_mark.cgroup",
                              use_bcc=self.report.has("bcc"))

    def _record(self) -> dict:
        return {"applied_at": time.time(), "config": self.config.path, "policy_source": self.source,
                "policy": self.policy.summary(), "notes": list(self.policy.notes),
                "mode": self.config.enforcement.mode, "scope": list(self.config.enforcement.scope),
                "table": self.config.enforcement.table, "trusted_resolvers": self.trusted,
                "capabilities": self.report.to_dict(), "daemon_pid": os.getpid()}

    def _seed_from_kernel(self) -> None:
        """A restarted daemon picks up what the kernel still allows, with its expiry."""
        now = time.time()
        for item in self.table.learned():
            if item.name:
                self.snooper.learned.setdefault(item.name, {})[item.address] = now + item.expires
                self.snooper.total += 1

    def _take_lock(self) -> None:
        """An abstract socket of the network namespace: the lock that keeps one daemon per
        namespace (what WSL2 needs: its distributions share a network namespace, not /run),
        and a control socket every distribution can reach."""
        self.lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.lock.bind(abstract_address(self.config))
        except OSError:
            self.lock.close()
            self.lock = None
            raise DaemonError("another ramfw daemon is running in this network namespace "
                              "(`ramfw status` talks to it)") from None
        self.lock.listen(16)

    def _open_control(self) -> None:
        """The control socket: a file for this system, beside the namespace's abstract one."""
        path = Path(self.config.daemon.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(str(path))
        os.chmod(path, 0o600)
        self.control.listen(16)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {signal.SIGHUP: self._on_sighup, signal.SIGTERM: self._on_stop, signal.SIGINT: self._on_stop}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        sel = selectors.DefaultSelector()
        if self.queue:
            sel.register(self.queue.sock, selectors.EVENT_READ, self._on_queue)
        if self.snoop:
            sel.register(self.snoop.sock, selectors.EVENT_READ, self._on_snoop)
        if self.blocks:
            sel.register(self.blocks.sock, selectors.EVENT_READ, self._on_block)
        sel.register(self.control, selectors.EVENT_READ, lambda: self._on_control(self.control))
        sel.register(self.lock, selectors.EVENT_READ, lambda: self._on_control(self.lock))
        sel.register(wake_r, selectors.EVENT_READ, lambda: _drain(wake_r))
        self._wake = wake_w
        if self.url_source is not None:
            threading.Thread(target=self._poll_policy, name="policy-poller", daemon=True).start()
        next_housekeeping = time.monotonic() + HOUSEKEEPING
        try:
            while not self.stopping:
                for key, _ in sel.select(max(0.0, next_housekeeping - time.monotonic())):
                    self._guarded(key.data)
                if self.reload_requested:
                    self.reload_requested = False
                    self._guarded(self.reload)
                if time.monotonic() >= next_housekeeping:
                    self._guarded(self._housekeeping)
                    next_housekeeping = time.monotonic() + HOUSEKEEPING
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sel.close()
            wake_r.close()
            wake_w.close()
            self.close()

    def _poll_policy(self) -> None:
        """Background: poll the policy URL; a new valid policy wakes the loop to reload."""
        while not self.stopping:
            self._poll_now.wait(self.config.policy.refresh_interval)
            self._poll_now.clear()
            if self.url_source.refresh():
                self.reload_requested = True
                try:
                    self._wake.send(b"r")
                except OSError:
                    pass
            if self.url_source.last_error and self.url_source.last_error not in self.errors:
                self._error(self.url_source.last_error)

    def _guarded(self, step) -> None:
        """Whatever goes wrong in one step is logged and counted; the daemon keeps running,
        and with it the enforcement and the DNS it holds."""
        try:
            step()
        except Exception as err:  # noqa: BLE001 - the daemon must outlive its own bugs
            self.snooper.counters["errors"] += 1
            self._error(f"{getattr(step, '__name__', 'step')}: {err!r}")

    def _on_sighup(self, *_):
        self.reload_requested = True

    def _on_stop(self, *_):
        self.stopping = True

    def _on_queue(self) -> None:
        """Give a verdict to every held reply waiting (a bounded number of datagrams, so the
        other sockets get their turn); return when the socket is empty."""
        for _ in range(BURST):
            try:
                packets = self.queue.receive()
            except OSError as err:
                self.snooper.counters["queue_errors"] += 1
                self._error(f"queue: {err}")
                return
            if not packets:
                return
            self.snooper.counters["held"] += len(packets)
            for packet in packets:
                decision = self._read(packet.payload)
                self.queue.verdict(packet.packet_id, NF_ACCEPT if decision.accept else NF_DROP)

    def _on_snoop(self) -> None:
        """Read the copied replies waiting (passive hold, or those the prefilter let pass)."""
        for _ in range(BURST):
            try:
                payloads = self.snoop.receive()
            except OSError:
                return
            if not payloads:
                return
            self.snooper.counters["copied"] += len(payloads)
            for payload in payloads:
                self._read(payload)

    def _read(self, payload: bytes) -> dnsreply.Decision:
        """Decide on one reply and program what it teaches; the caller issues the verdict."""
        try:
            decision = self.snooper.on_packet(payload, time.time())
        except Exception as err:  # a packet must never stop the daemon; it is released
            self.snooper.counters["errors"] += 1
            self._error(f"reading a reply: {err!r}")
            return dnsreply.Decision()
        if decision.elements:
            self._program(decision.elements)
        return decision

    def _program(self, elements) -> None:
        """Program before the release; the kernel's refusals are read in housekeeping. Nothing
        here may keep a held reply from its verdict."""
        try:
            self.table.add_elements(elements, self.report.refresh_by_readd,
                                    clear_pending=self.hold == "passive", check=False)
        except (OSError, ValueError) as err:
            self.snooper.counters["program_failed"] += 1
            self._error(f"programming the allowed sets failed: {err}")

    def _on_block(self) -> None:
        try:
            packets = self.blocks.receive()
        except OSError:
            return
        if self.snoop is not None:  # copies of replies that name the address may still wait there
            self._on_snoop()
        for packet in packets:
            segment = dnsreply.parse_packet(packet)
            if segment is None:
                continue
            text = self.snooper.block_message(segment.dst)
            if self.config.enforcement.mode == "audit":
                text = f"audit: would block: {text}"
            self._log_block(f"{text} ({segment.dst} port {segment.dport})")
            self.recent_blocks.append({"time": time.time(), "message": text,
                                       "address": segment.dst, "port": segment.dport})

    def _log_block(self, line: str) -> None:
        """One log line per blocked destination per 10 s: a client retrying in a loop must not
        flood the log (status counts every one)."""
        now = time.monotonic()
        last, repeats = self._logged_blocks.get(line, (0.0, 0))
        if now - last < 10:
            self._logged_blocks[line] = (last, repeats + 1)
            return
        if len(self._logged_blocks) > 1024:
            self._logged_blocks.clear()
        self._logged_blocks[line] = (now, 0)
        log.warning("%s%s", line, f" (seen {repeats} more times since the last report)" if repeats else "")

    def _on_control(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2)
            try:
                request = json.loads(_read_line(conn) or "{}")
                _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
                command = request.get("command", "")
                if uid != 0 and command not in ("ping", "status"):
                    reply = {"ok": False, "error": f"{command} needs root"}
                else:
                    reply = self.handle(command)
            except (OSError, ValueError) as err:
                reply = {"ok": False, "error": str(err)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def handle(self, command: str) -> dict:
        if command == "ping":
            return {"ok": True}
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "stop":
            self.stopping = True
            return {"ok": True, "message": "the daemon is stopping"}
        if command == "reload":
            ok, message = self.reload()
            return {"ok": ok, "message": message}
        return {"ok": False, "error": f"unknown command {command!r}"}

    # -- policy and housekeeping -----------------------------------------------------------
    def reload(self) -> tuple[bool, str]:
        """Re-read the policy and apply it at once; a bad policy keeps the one in force."""
        self._poll_now.set()  # a URL source is fetched again in the background, then reloaded
        try:
            policy, source = api.load_policy(self.config, self.policy_path)
        except RamfwError as err:
            self._error(f"reload refused, the policy in force stays: {err}")
            return False, f"reload refused, the policy in force stays: {err}"
        if self.prefilter is not None:
            try:
                self.prefilter.update(policy.patterns())
            except OSError as err:  # replies for new names are then copied, not held: say so
                self._error(f"the DNS prefilter could not be updated ({err}); first connections to "
                            "newly allowed names may fail until it is")
        self.policy, self.source, self.policy_loaded = policy, source, time.time()
        self.snooper.policy = policy
        self.apply()
        gone = self.snooper.forget(time.time())
        still = {a for addresses in self.snooper.learned.values() for a in addresses}
        drop = {a for addresses in gone.values() for a in addresses} - still
        if drop and policy.enabled:
            self.table.delete_elements(drop)
        message = f"policy reloaded: {policy.organization}, {len(policy.matcher)} entries from {source}"
        log.info(message)
        return True, message

    def _housekeeping(self) -> None:
        for refusal in self.table.refusals():
            self.snooper.counters["program_failed"] += 1
            self._error(f"programming the allowed sets failed: {refusal}")
        if "engine" in self.config.enforcement.scope and not self.engine_state.get("attached"):
            self._attach_engine()
        mtime = _mtime(resolvers.RESOLV_CONF)
        if mtime != self.resolv_mtime and not self.config.dns.trusted_resolvers:
            self.resolv_mtime = mtime
            trusted = resolvers.trusted(())
            if trusted != self.trusted:
                self.trusted = trusted
                self.snooper.trusted = set(trusted)
                try:
                    self.table.run(ruleset.build_resolvers(self.table.name, trusted))
                except NftablesError as err:
                    self._error(str(err))
                log.info("trusted resolvers now %s", ", ".join(trusted))

    def _error(self, text: str) -> None:
        log.error(text)
        self.errors.append(text)

    def status(self) -> dict:
        now = time.time()
        counters = self.table.counters()
        learned = {name: sorted(({"address": a, "expires_in": int(expiry - now)}
                                 for a, expiry in addresses.items() if expiry > now),
                                key=lambda x: x["address"])
                   for name, addresses in sorted(self.snooper.learned.items())}
        notes = list(self.policy.notes)
        if self.hold == "passive":
            notes.append("DNS replies are copied, not held: the first connection to a new address can be "
                         "lost; mitigation: a first SYN to an unknown address is dropped, not reset, so its "
                         "retransmission (1 s later) passes once the reply has been read")
        notes += [f"cap reached: {cap}" for cap in self.snooper.caps_hit]
        if self.engine_state.get("note"):
            notes.append(f"engine scope: {self.engine_state['note']}")
        return {
            "daemon": {"running": True, "pid": os.getpid(), "since": self.started},
            "enforcing": bool(counters),
            "mode": self.config.enforcement.mode,
            "scope": list(self.config.enforcement.scope),
            "dns_hold": self.hold + (" + eBPF prefilter: only replies that may be for allowlisted names "
                                     "are held, the rest are copied" if self.prefilter else ""),
            "engine": self.engine_state,
            "capabilities": self.report.to_dict(),
            "policy": {**self.policy.summary(), "source": self.source, "loaded_at": self.policy_loaded,
                       **({"url": self.url_source.url, "url_error": self.url_source.last_error}
                          if self.url_source else {})},
            "trusted_resolvers": self.trusted,
            "learned": {k: v for k, v in learned.items() if v},
            "counters": {**dict(self.snooper.counters),
                         **counters,
                         "learned_addresses": self.snooper.total},
            "recent_blocks": list(self.recent_blocks),
            "notes": notes,
            "errors": list(self.errors),
        }

    def close(self) -> None:
        for thing in (self.queue, self.snoop, self.blocks, getattr(self, "prefilter", None)):
            if thing is not None:
                thing.close()
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.config.daemon.socket)
            except FileNotFoundError:
                pass
        if self.lock is not None:
            self.lock.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except (BlockingIOError, OSError):
        pass


def _read_line(conn: socket.socket, limit: int = 65536) -> str:
    data = bytearray()
    while b"\n" not in data[-65536:] and len(data) < limit:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def abstract_address(config: Config) -> str:
    return f"\0ramfw/{config.enforcement.table}"


def request(config: Config, command: str, timeout: float = 5.0) -> dict:
    """Ask the daemon (its socket file, else the namespace's abstract socket); DaemonError if
    neither answers."""
    failures = []
    for address in (config.daemon.socket, abstract_address(config)):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.sendall(json.dumps({"command": command}).encode() + b"\n")
                return json.loads(_read_line(sock, 1 << 26))
        except (OSError, ValueError) as err:
            failures.append(str(err))
    raise DaemonError(f"the ramfw daemon is not reachable ({config.daemon.socket}: {failures[0]})")


def answers(config: Config) -> bool:
    try:
        request(config, "ping", timeout=1)
    except DaemonError:
        return False
    return True


def main(config: Config, policy_path: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="ramfw[%(process)d]: %(levelname)s: %(message)s")
    daemon = Daemon(config, policy_path)
    try:
        daemon.start()
    except BaseException:
        daemon.close()
        raise
    daemon.run()
    log.info("ramfw daemon stopped; enforcement stays in place until `ramfw down`")
    return 0
