"""The shape of the package: no import cycle, the pure core apart from the kernel, one writer
of the table, no lab code shipped, no module too long to read."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ramfw"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ramfw modules ``name`` imports, at any depth of its code (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle():
    edges = graph()
    # A package's __init__ is imported with any of its modules: only its own imports count.
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own module lazily is not a cycle
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_pure_core_imports_nothing_from_the_kernel_layer_or_the_daemon():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith(("ramfw.snoop", "ramfw.policy", "ramfw.check", "ramfw.tls")) or name in ("ramfw.config", "ramfw.errors"):
            bad = {t for t in targets if t.startswith(("ramfw.kernel", "ramfw.daemon", "ramfw.api", "ramfw.cli"))}
            assert not bad, f"{name} imports {bad}"


def test_only_the_table_module_writes_nftables():
    writers = {name for name, path in modules().items() if "Nftables()" in path.read_text()}
    # probes: a throw-away table; ctmarks: every table's rules, read only
    assert writers == {"ramfw.kernel.table", "ramfw.kernel.probes", "ramfw.kernel.ctmarks"}
    commands = re.findall(r"json_cmd\((.*)\)", modules()["ramfw.kernel.ctmarks"].read_text())
    assert commands == ['{"nftables": [{"list": {"ruleset": None}}]}'], "ctmarks lists the ruleset, and only lists"
    senders = {name for name, path in modules().items() if "build_elements_batches(" in path.read_text()
               or "build_rules_batch(" in path.read_text()}
    assert senders <= {"ramfw.kernel.table", "ramfw.kernel.nft"}
    # an owned table takes changes from its owner's socket only: every transaction goes through Table's
    transactors = {name for name, path in modules().items() if "transact(" in path.read_text()}
    assert transactors <= {"ramfw.kernel.table", "ramfw.kernel.netlink", "ramfw.kernel.probes"}


def test_no_lab_code_in_the_package():
    for name, path in modules().items():
        text = path.read_text()
        assert "ip netns" not in text and "dnsmasq" not in text.replace("dnsmasq `--nftset`", ""), name


def test_no_module_is_too_long_to_read():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 420}
    assert not long
