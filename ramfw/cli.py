"""The ramfw command: parses arguments, calls the library or the daemon, prints.

Exit codes: 0 success; 1 not enforcing (status) or an unexpected failure; 2 invalid policy,
configuration or command line; 3 the kernel lacks what ramfw needs; 4 nftables refused a
transaction; 5 the daemon could not be reached; 6 root is needed; 7 a queue or log group ramfw
needs is held by another program; 8 enforcing, but not as configured (status: engine scope
cannot be trusted, so host scope is in force on the registry ports; or the policy is out of
date: expired, or its source silent for longer than policy.max_staleness). ``check``: 0 every
host the pulls touch is allowed by the policy and by the kernel now; 1 the policy blocks one
(the entries to add are printed); 8 the policy allows them but the kernel would refuse one now;
9 a probe could not finish (the registry could not be reached, or refused the pull).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__, api, record
from . import config as config_mod
from .check import probe, verdict
from .tls import doctor as tls_doctor
from .daemon.blocks import advice, client_text, listed
from .errors import RamfwError
from .policy import source as policy_source


def _print_status(result: dict) -> None:
    print(result["message"])
    pol = result.get("policy")
    if pol:
        source = f" from {pol['source']}" if pol.get("source") else ""
        print(f"policy:     {pol['organization']}, {pol['entries']} entries, Docker Hub "
              f"{'allowed' if pol['allowDockerHub'] else 'blocked'}{source}")
        _print_freshness(pol)
    if result.get("scope"):
        print(f"scope:      {', '.join(result['scope'])}")
    caps = result.get("capabilities") or {}
    if caps:
        missing = [c["name"] for c in caps.get("capabilities", []) if not c["ok"]]
        print(f"kernel:     {caps.get('kernel')}; missing: {', '.join(missing) or 'nothing'}")
    if result.get("dns_hold"):
        print(f"DNS hold:   {result['dns_hold']}")
    if "trusted_resolvers" in result:
        origin = f" (from {result['trusted_from']})" if result.get("trusted_from") else ""
        print(f"resolvers:  {', '.join(result['trusted_resolvers']) or 'NONE: nothing is learned'}{origin}")
    if result.get("scope_in_force") and result["scope_in_force"] != result.get("scope"):
        print(f"in force:   {', '.join(result['scope_in_force'])} (widened: fail closed)")
    eng = result.get("engine") or {}
    if eng:
        print(f"engine:     {'marked' if eng.get('attached') else 'NOT marked'}, loader: {eng.get('loader')}")
        for row in eng.get("cgroups") or []:
            print(f"  cgroup:   {row['path']}: {'marked' if row['marked'] else 'NOT marked'} ({row['why']})")
    if result.get("table"):
        print(f"table:      {result['table']['protection']}")
    daemon = result.get("daemon") or {}
    # the daemon's release (an older one may still run after an upgrade), else this command's
    version = daemon.get("version", "before 0.2.0") if daemon.get("running") else result.get("version", __version__)
    print(f"daemon:     {'running, pid ' + str(daemon['pid']) if daemon.get('running') else 'not running'}, "
          f"ramfw {version}")
    counters = result.get("counters") or {}
    if counters:
        print("counters:   " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    for name, items in (result.get("learned") or {}).items():
        shown = ", ".join(f"{i['address']} ({i['expires_in']}s)" for i in items[:6])
        more = f" and {len(items) - 6} more" if len(items) > 6 else ""
        print(f"learned:    {name}: {shown}{more}")
    tls = result.get("tls") or {}
    if tls.get("state") == "active":
        counts = tls.get("counters") or {}
        print(f"TLS names:  checked on ports {', '.join(map(str, tls['ports']))}: {counts.get('allowed', 0)} "
              f"allowed, {counts.get('refused', 0)} refused, {tls['flows_waiting']} flows kept")
    for note in result.get("notes") or []:
        print(f"note:       {note}")
    seen: dict[str, int] = {}
    for block in result.get("recent_blocks") or []:
        client = block.get("client") or {}
        line = f"{block['message']} ({block['address']} port {block['port']})" + (
            f" by {client_text(client)}" if client.get("recorded") else "")
        seen[line] = seen.pop(line, 0) + 1  # re-inserted: the most recent come last
    for line, count in list(seen.items())[-10:]:
        print(f"blocked:    {line}" + (f" x{count}" if count > 1 else ""))
    hosts = list(dict.fromkeys(b["host"] for b in (result.get("recent_blocks") or [])[-50:] if b.get("host")))
    if hosts:
        print(f"to allow:   {advice(*hosts[-5:])}")
    for error in (result.get("errors") or [])[-5:]:
        print(f"error:      {error}")


def _print_freshness(pol: dict) -> None:
    """Version, signer, fetched-at, age, next poll; STALE first when status is red for it."""
    if pol.get("stale"):
        print(f"STALE:      {pol['stale']}")
    if "version" not in pol:
        return  # a record written before policies had versions
    signer = f"signed by {pol['signer']}" if pol.get("signer") else "unsigned"
    line = f"version:    {pol['version'] or 'none'}, {signer}"
    if pol.get("expires"):
        line += time.strftime(", expires %Y-%m-%dT%H:%M:%SZ", time.gmtime(pol["expires"]))
    if pol.get("fetched_at"):
        line += time.strftime(", fetched %Y-%m-%dT%H:%M:%SZ", time.gmtime(pol["fetched_at"])) + f" ({pol['age']} s ago)"
    if pol.get("next_poll_in") is not None:
        line += f", next poll in {pol['next_poll_in']} s"
    print(line)


def _print_doctor(report, table_owner: bool = True) -> None:
    print(f"kernel {report.kernel}: at least 5.4, ok")
    for cap in report.capabilities:
        mark = "yes" if cap.ok else "NO "
        print(f"  [{mark}] {cap.name:16} {cap.detail}")
        if not cap.ok:
            print(f"        {'':16} cost: {cap.cost}")
    prefiltered = report.hold.holds and report.has("dns_prefilter")
    print(f"DNS replies are held by: {report.hold.value}"
          + (", only those that may be for allowlisted names (eBPF prefilter)" if prefiltered else "")
          + ("; UDP replies paired with their queries in the kernel" if prefiltered and report.has("dns_pairing")
             else "; UDP replies paired with their queries by the daemon"))
    if report.has("cgroup_bpf") and not report.has("cgroup_paths"):
        print("engine scope: NOT usable as ramfw runs now (a cgroup namespace): a daemon configured for it puts "
              "host scope in force on the registry ports instead (fail closed)")
    elif report.has("cgroup_bpf"):
        loader = "bcc (compiles bpf/mark.bpf.c)" if report.has("bcc") else "hand-assembled, no compiler needed"
        print(f"engine scope: available; its eBPF program is loaded {loader}")
    else:
        print("engine scope: NOT available here (no cgroup eBPF or no cgroup v2): a daemon configured for it "
              "puts host scope in force on the registry ports instead (fail closed)")
    print(f"protection: {report.protection(table_owner)}")
    if report.owns_table(table_owner):
        print("tamper: while the daemon is stopped the table keeps enforcing but is not owned: anyone may change it "
              "until a daemon takes it back; root can always kill the daemon or remove ramfw")
    else:
        print("tamper: a change another process makes to ramfw's table (nft flush ruleset, ...) is seen as it is "
              "committed and put back within a second by the daemon, which names the process; the table is not "
              "protected from the change itself: root can always remove ramfw")
    print("ramfw cannot enforce here" if report.missing_required() else "ramfw can enforce here")


def _report_text(result: dict) -> str:
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"  # noqa: E731
    lines = [f"what ramfw saw ({result['file']}, saved {when(result['saved_at'])}):"]
    refused = sorted(result["refused"].items(), key=lambda item: -item[1]["count"])
    lines.append(f"refused ({len(refused)} host(s); in audit mode, would have been):" if refused else "refused: nothing")
    for host, seen in refused:
        lines.append(f"  {host:40} {seen['count']:6}x {seen.get('verdict', ''):8} "
                     f"ports {','.join(map(str, seen.get('ports', [])))}  "
                     f"clients {','.join(map(listed, seen.get('clients', []) + seen.get('processes', [])))}  first {when(seen['first'])}  last {when(seen['last'])}")
    lines.append(f"use of {result['organization']}'s entries (lookups learned from, connections to what they taught):")
    for entry, use in sorted(result["usage"].items()):
        lines.append(f"  {entry:40} {use['lookups']:6} lookups {use.get('connections', 0):6} connections   "
                     f"last {when(use['last'])}" + ("   (unused: prune it?)" if not use["lookups"] and not use.get("connections") else ""))
    return "\n".join(lines)


def _print_check(result: dict) -> None:
    for note in result["notes"]:
        print(f"note: {note}")
    for report in result["images"]:
        print("\n".join(verdict.to_lines(report)))
    if result["todo"]:
        print(f"to make these pulls work: {result['todo']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ramfw", description="Registry firewall for the container VM.")
    parser.add_argument("--version", action="version", version=f"ramfw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="apply the ruleset for a policy")
    up.add_argument("--policy", help="policy JSON file (default: the configured source)")
    daemon = commands.add_parser("daemon", help="run the daemon in the foreground")
    daemon.add_argument("--policy", help="policy JSON file (default: the configured source)")
    daemon.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON objects "
                        "(default: daemon.log_format)")
    reload = commands.add_parser("reload", help="make the daemon re-read the policy now")
    boot = commands.add_parser("boot", help="WSL2 boot entry: load modules, start one daemon")
    boot.add_argument("--install", metavar="COMMAND", help="add COMMAND to /etc/wsl.conf [boot] instead")
    boot.add_argument("--wsl-conf", default="/etc/wsl.conf", help=argparse.SUPPRESS)
    boot.add_argument("--log", default="/var/log/ramfw.log", help="the daemon's log file")
    down = commands.add_parser("down", help="remove everything ramfw added")
    status = commands.add_parser("status", help="what is enforced, learned and blocked")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    doctor = commands.add_parser("doctor", help="what this kernel can do and what ramfw will use")
    pol = commands.add_parser("policy", help="policy tools")
    pol_commands = pol.add_subparsers(dest="policy_command", required=True)
    lint = pol_commands.add_parser("lint", help="validate a policy file and warn about gaps")
    lint.add_argument("file")
    placed = pol_commands.add_parser("placed", help="exit 0 if a policy is placed (the unit's ExecCondition)")
    report = commands.add_parser("report", help="what was refused (audit: would have been) and each entry's use")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    suggest = pol_commands.add_parser("suggest", help="a policy allowing what was refused (exact hosts only)")
    suggest.add_argument("--diff", action="store_true", help="only the entries to add")
    for sub in (report, suggest):
        sub.add_argument("--policy", help="policy JSON file (default: the policy in force)")
    check = commands.add_parser("check", help="probe pulls: the hosts they touch, allowed or not, what to add")
    check.add_argument("images", nargs="+", metavar="IMAGE")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--certs-dir", default=probe.CERTS_DIR, help="the engine's per-registry CAs, "
                       f"<dir>/<registry>/*.crt, beside the system store (default: {probe.CERTS_DIR})")
    for sub in (up, daemon, reload, boot, down, status, lint, placed, report, suggest, doctor, check):
        sub.add_argument("--config", help=f"configuration file (default: {config_mod.DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except RamfwError as err:
        print(f"ramfw: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the system refused something ramfw did not foresee: one line, not a traceback
        print(f"ramfw: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    config = config_mod.load(args.config)
    if args.command == "doctor":
        report = api.doctor(config)
        _print_doctor(report, config.enforcement.table_owner)
        print(tls_doctor.doctor_text(config.enforcement, report, api.mark_writers(config)))
        for line in policy_source.describe(config.policy):
            print(line)
        for note in record.proxy_notes(config):
            print(f"proxy: {note}")
        return 3 if report.missing_required() else 0
    if args.command == "up":
        applied = api.up(config, args.policy)
        pol = applied["policy"]
        state = "enforcing" if pol["enabled"] else "not restricting (registryAccess.enabled is false)"
        print(f"ramfw {state}: {pol['organization']}, {pol['entries']} entries, "
              f"mode {applied['mode']}, scope {', '.join(applied['scope_in_force'])}")
        for note in applied["notes"]:
            print(f"note: {note}", file=sys.stderr)
        return 0
    if args.command == "daemon":
        from . import daemon

        return daemon.main(config, args.policy, args.log_format)
    if args.command == "boot":
        from pathlib import Path

        from . import boot

        if args.install:
            print(boot.install(args.install, Path(args.wsl_conf)))
        else:
            print(boot.boot(config, args.config, args.log))
        return 0
    if args.command == "reload":
        print(api.reload(config))
        return 0
    if args.command == "down":
        api.down(config)
        print("ramfw removed")
        return 0
    if args.command == "status":
        result = api.status(config)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_status(result)
        stale = (result.get("policy") or {}).get("stale") and result["enforcing"]
        return 8 if result.get("degraded") or stale else 0 if result["enforcing"] else 1
    if args.command == "report":
        result = api.report(config, args.policy)
        print(json.dumps(result, indent=1, sort_keys=True) if args.json else _report_text(result))
        return 0
    if args.command == "policy" and args.policy_command == "suggest":
        data, added, notes = api.suggest(config, args.policy)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print("\n".join(f"+ {entry}" for entry in added) if args.diff else json.dumps(data, indent=2))
        return 0


    if args.command == "check":
        result = api.check(config, args.images, args.certs_dir)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_check(result)
        return result["exit"]
    if args.command == "policy" and args.policy_command == "placed":
        where = api.placed(config)
        if where is None:
            print(f"no policy is placed: {config.policy.source} is missing and nothing is cached; "
                  "ramfw does nothing until one is")
            return 1
        print(f"policy placed: {where}")
        return 0
    if args.command == "policy":
        policy, warnings = api.lint(args.file, config)
        print(f"{args.file}: valid: organization {policy.organization}, "
              f"{len(policy.registries)} registries, {len(policy.matcher)} entries in force"
              + (f", version {policy.version}" if policy.version else ", no version")
              + (time.strftime(", expires %Y-%m-%dT%H:%M:%SZ", time.gmtime(policy.expires)) if policy.expires else ""))
        for warning in warnings:
            print(f"warning: {warning}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
