"""The WSL2 boot entry: every distribution's ``[boot] command=`` runs it; one daemon results.

WSL2 distributions share the utility VM's network namespace but not their file systems, so
the daemon's singleton lock is an abstract socket of that namespace (``daemon.control``), not a
file. Booting twice, or from two distributions at once, leaves exactly one daemon.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import Config
from .daemon import control
from .errors import RamfwError
from .kernel import probes

# Modules ramfw may need where the kernel has them as modules (WSL2 6.6+ loads them from its
# modules disk); built-in ones need nothing, missing ones are reported by the probes.
MODULES = ("nf_tables", "nft_ct", "nft_reject_inet", "nft_log", "nft_queue", "nft_compat", "xt_NFQUEUE",
           "nfnetlink_queue", "nfnetlink_log", "nf_conntrack")
WSL_CONF = Path("/etc/wsl.conf")


def load_modules() -> list[str]:
    """modprobe what is not loaded or built in; return the ones that could not be loaded."""
    modprobe = shutil.which("modprobe")
    failed = []
    for name in MODULES:
        if Path(f"/sys/module/{name}").exists():
            continue
        if modprobe is None or subprocess.run([modprobe, "-q", name], capture_output=True).returncode != 0:
            failed.append(name)
    return failed


def boot(config: Config, config_path: str | None, log_file: str) -> str:
    """Check the kernel, load modules, start the daemon unless one already runs; say what happened."""
    probes.check_kernel()
    if control.answers(config):
        return "ramfw daemon already running in this network namespace"
    failed = load_modules()
    report = probes.run(Path(config.daemon.run_dir) / probes.CACHE)
    report.check_required()
    args = [sys.executable, "-m", "ramfw.cli", "daemon"] + (["--config", config_path] if config_path else [])
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while not control.answers(config):
        # If ours exited, another distribution's boot may have won the race: its daemon,
        # still starting, serves everyone once it answers.
        if time.monotonic() > deadline:
            state = "exited" if proc.poll() is not None else "did not answer within 30 s"
            raise RamfwError(f"the ramfw daemon {state}; see {log_file}")
        time.sleep(0.1)
    # A daemon answers; if it is another distribution's, ours stops at the namespace's lock:
    # return once it has, so there is one daemon when boot is done.
    answering = control.request(config, "status").get("status", {}).get("daemon", {}).get("pid")
    if answering != proc.pid:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    missing = f" (modules not loadable, probably built in or absent: {', '.join(failed)})" if failed else ""
    return f"ramfw daemon running; DNS hold: {report.hold.value}{missing}"


def add_boot_command(text: str, command: str) -> str:
    """/etc/wsl.conf with ``command`` in its [boot] section, once; everything else kept."""
    if command in text:
        return text
    lines = text.splitlines()
    section = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip().lower()
        elif section == "boot" and stripped.split("=", 1)[0].strip() == "command":
            existing = stripped.split("=", 1)[1].strip().strip('"')
            lines[index] = f'command = "{existing}; {command}"' if existing else f'command = "{command}"'
            return "\n".join(lines) + "\n"
    for index, line in enumerate(lines):
        if line.strip().lower() == "[boot]":
            lines.insert(index + 1, f'command = "{command}"')
            return "\n".join(lines) + "\n"
    prefix = "\n".join(lines) + "\n\n" if lines else ""
    return f'{prefix}[boot]\ncommand = "{command}"\n'


def install(command: str, wsl_conf: Path = WSL_CONF) -> str:
    text = wsl_conf.read_text() if wsl_conf.exists() else ""
    updated = add_boot_command(text, command)
    if updated == text:
        return f"{wsl_conf} already starts ramfw at boot"
    wsl_conf.write_text(updated)
    return f"{wsl_conf}: ramfw starts at boot (restart WSL: wsl --shutdown)"
