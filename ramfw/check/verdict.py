"""What a probed pull needs (pure): every host it touched, and the ones the registry profiles
name for what the probe could not see; for each, whether the policy in force allows it and
whether the kernel allows its addresses now; the exact entries to add; an exit code.

The kernel is read after the probe, whose lookups went to the trusted resolvers as the
engine's do: a host the policy allows whose addresses the kernel has not learned means
learning does not work for it (no daemon, a reply not held), and the pull would be refused.
Entries are exact host names, never a wildcard: a profile's ``*.cloudfront.net`` is shared
hosting (anyone's registry), and the probe names the one host this pull uses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..policy import Policy, hosting, profiles
from ..policy.names import InvalidName, Pattern, canonical, parse_entry
from .reference import is_address

EXIT_ALLOWED, EXIT_BLOCKED, EXIT_KERNEL, EXIT_INCOMPLETE = 0, 1, 8, 9
ALLOW_DOCKER_HUB = '"allowDockerHub": true'
_ROLES = {"registry": "registry", "token": "token endpoint", "blob": "blobs"}
_KERNEL_PASSES = ("learned", "not enforcing", "audit mode", "not egress")


@dataclass(frozen=True)
class Kernel:
    """What the kernel allows now: ``learned`` maps each address in the allowed sets to the
    name it was learned for. Not ``enforcing``: no ramfw table, nothing is refused."""

    enforcing: bool
    mode: str = "enforce"
    learned: dict[str, str] = field(default_factory=dict)
    readable: bool = True


def _local(host: str) -> bool:
    """Loopback is not egress: ramfw never filters it."""
    return host == "localhost" or (is_address(host) and ipaddress.ip_address(host).is_loopback)


def _answer(step: dict) -> str:
    if step["error"]:
        return step["error"]
    target = f" to {step['location'].split('/')[2]}" if step["location"] else ""
    return f"HTTP {step['status']}{target}"


def touched(probe: dict) -> list[dict]:
    """The hosts in the order the pull met them: roles, the addresses asked, the last answer."""
    hosts: dict[str, dict] = {}
    chain = "registry"
    for step in probe.get("steps", []):
        chain = step["role"] if step["role"] != "redirect" else chain
        role = _ROLES.get(step["role"]) or f"{_ROLES[chain]} redirect"
        row = hosts.setdefault(step["host"], {"host": step["host"], "roles": [], "addresses": [], "source": "probe"})
        if role not in row["roles"]:
            row["roles"].append(role)
        row["addresses"] = list(dict.fromkeys(row["addresses"] + list(step["addresses"])))
        row["answer"] = _answer(step)
    return list(hosts.values())


def _profile_hosts(probe: dict, seen: list[dict]) -> list[dict]:
    """Hosts the registry's profile names that the probe did not touch."""
    names = [row["host"] for row in seen]
    found = []
    for profile in profiles.PROFILES:
        for need in profile.needed(probe["registry"]):
            pattern = parse_entry(need).pattern
            if any(_under(name, pattern) for name in names):
                continue  # the probe saw which host of it this pull uses
            found.append({"host": need, "roles": [f"named by the {profile.name} profile"], "addresses": [],
                          "source": "profile", "answer": "not probed", "profile": profile.name})
    return found


def _under(name: str, pattern: Pattern) -> bool:
    if name == pattern.domain:
        return not pattern.subdomains_only
    return name.endswith("." + pattern.domain)


def _policy(host: str, policy: Policy) -> tuple[str, str]:
    """(verdict, the entry that allows it)."""
    if _local(host):
        return "not egress", ""
    if not policy.enabled:
        return "not restricted", ""
    if is_address(host):
        return "blocked", ""
    try:
        pattern = parse_entry(host).pattern
    except InvalidName:
        return "blocked", ""
    entry = policy.matcher.covers(pattern) if pattern.subdomains_only else policy.allows(canonical(host))
    return ("allowed", entry.to_text()) if entry is not None else ("blocked", "")


def _kernel(row: dict, kernel: Kernel) -> tuple[str, list[str]]:
    """(verdict, the names the kernel learned its addresses for)."""
    if _local(row["host"]):
        return "not egress", []
    if row["source"] == "profile":
        return "not probed", []
    if not kernel.readable:
        return "unknown", []
    if not kernel.enforcing:
        return "not enforcing", []
    if kernel.mode == "audit":
        return "audit mode", []
    if not row["addresses"]:
        return "no address", []
    known = [a for a in row["addresses"] if a in kernel.learned]
    names = sorted({kernel.learned[a] for a in known})
    if len(known) == len(row["addresses"]):
        return "learned", names
    return ("partly learned" if known else "not learned"), names


def _entries(row: dict, policy: Policy, registry: str) -> tuple[list[str], list[str]]:
    """(entries to add, warnings) for a host the policy blocks."""
    host = row["host"]
    if host in profiles.DOCKER_HUB_HOSTS and not policy.allow_docker_hub:
        return [ALLOW_DOCKER_HUB], []
    if is_address(host):
        return [], [f"{host} is an IP address, which no policy entry can allow: pull by a host name"]
    if host.startswith("*."):
        shared = hosting.shared(parse_entry(host).pattern)
        return [], [f"pulls from {registry} may use {host} ({row.get('profile')} profile), and the probe could not "
                    "see which host: pull once and read `ramfw status`, whose block message names it"
                    + (f"; do not allow {host} itself: {shared}" if shared else "")]
    shared = hosting.shared(Pattern(canonical(host)))
    return [canonical(host)], [f"{host}: {shared}"] if shared else []


def judge(probe: dict, policy: Policy, kernel: Kernel) -> dict:
    """One image's report: its hosts with their verdicts, what to add, and the verdict."""
    seen = touched(probe)
    rows = seen + _profile_hosts(probe, seen)
    add: list[str] = []
    warnings: list[str] = []
    for row in rows:
        row["counts"] = row["source"] == "probe" or not probe["complete"]
        row["policy"], row["entry"] = _policy(row["host"], policy)
        row["kernel"], row["learned_as"] = _kernel(row, kernel)
        if row["policy"] != "blocked":
            continue
        entries, notes = _entries(row, policy, probe["registry"])
        if row["counts"]:
            add += [e for e in entries if e not in add]
            warnings += notes
        elif entries:
            warnings.append(f"{row['host']} is named by the {row['profile']} profile but this pull did not touch "
                            f"it; pulls may use it another time: also allow {', '.join(entries)}")
    counted = [row for row in rows if row["counts"]]
    if any(row["policy"] == "blocked" for row in counted):
        verdict = "blocked"
    elif not probe["complete"]:
        verdict = "incomplete"
    elif any(row["kernel"] not in _KERNEL_PASSES for row in counted):
        verdict = "not allowed by the kernel now"
    else:
        verdict = "allowed"
    return {**{k: v for k, v in probe.items() if k != "steps"}, "hosts": rows, "add": add, "warnings": warnings,
            "verdict": verdict, "steps": probe.get("steps", [])}


def exit_code(reports: list[dict]) -> int:
    """1 blocked by the policy, else 9 a probe could not finish, else 8 the kernel would refuse
    an allowed host now, else 0."""
    verdicts = {report["verdict"] for report in reports}
    for verdict, code in (("blocked", EXIT_BLOCKED), ("incomplete", EXIT_INCOMPLETE),
                          ("not allowed by the kernel now", EXIT_KERNEL)):
        if verdict in verdicts:
            return code
    return EXIT_ALLOWED


def summary(reports: list[dict]) -> tuple[list[str], str]:
    """(every entry to add, once; what to do with them)."""
    add = list(dict.fromkeys(e for report in reports for e in report["add"]))
    names = [e for e in add if e != ALLOW_DOCKER_HUB]
    todo = []
    if names:
        todo.append("add to the policy's registries: " + ", ".join(f'{{"address": "{e}"}}' for e in names))
    if ALLOW_DOCKER_HUB in add:
        todo.append(f"set {ALLOW_DOCKER_HUB} in the policy's registryAccess")
    return add, ("; ".join(todo) + " (then `ramfw reload`)") if todo else ""


def to_lines(report: dict) -> list[str]:
    """The text form of one image's report."""
    why = {"allowed": "the pull would work", "blocked": "the pull would fail: the policy blocks "
           + ", ".join(r["host"] for r in report["hosts"] if r["counts"] and r["policy"] == "blocked"),
           "incomplete": f"the probe stopped: {report['error']}",
           "not allowed by the kernel now": "allowed by the policy, but the kernel would refuse "
           + ", ".join(r["host"] for r in report["hosts"] if r["counts"] and r["kernel"] not in _KERNEL_PASSES)}
    lines = [f"{report['reference']}: {why[report['verdict']]}"]
    if report["verdict"] == "blocked" and report["error"]:
        lines.append(f"  (the probe stopped: {report['error']})")
    width = min(max([len(r["host"]) for r in report["hosts"]] + [10]), 32)
    for row in report["hosts"]:
        policy = f"allowed by {row['entry']}" if row["entry"] else row["policy"].upper() if \
            row["policy"] == "blocked" else row["policy"]
        kernel = row["kernel"] + (f" ({', '.join(row['learned_as'])})" if row["learned_as"] else "")
        prefix = "" if row["counts"] else "(may also use) "
        lines.append(f"  {row['host']:{width}}  {prefix}{', '.join(row['roles'])}: {row['answer']}; "
                     f"policy: {policy}; kernel: {kernel}")
    if report["add"]:
        lines.append(f"  add: {', '.join(report['add'])}")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return lines
