import pytest

from ramfw import sandbox as lab_mod


@pytest.fixture
def lab():
    reason = lab_mod.skip_reason()
    if reason:
        pytest.skip(reason)
    the_lab = lab_mod.Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def write_config(tmp_path):
    def write(extra: str = "", **enforcement) -> str:
        # Never let a test's daemon find (and mark) an engine running on the host itself.
        enforcement.setdefault("engine_processes", ["ramfw-test-no-engine"])
        lines = [f"{k} = {v!r}" if not isinstance(v, (list, tuple)) else f"{k} = {list(v)!r}"
                 for k, v in enforcement.items()]
        path = tmp_path / "ramfw.toml"
        path.write_text(
            "[enforcement]\n" + "\n".join(lines).replace("'", '"') + "\n"
            f"[daemon]\nrun_dir = \"{tmp_path}/run\"\n"
            f"[policy]\nsource = \"{tmp_path}/policy.json\"\ncache = \"{tmp_path}/cache.json\"\n" + extra
        )
        return str(path)
    return write


@pytest.fixture
def write_policy(tmp_path):
    import json

    def write(registries, name="policy.json", **access) -> str:
        path = tmp_path / name
        entries = [{"address": r} if isinstance(r, str) else r for r in registries]
        path.write_text(json.dumps({"organizations": [
            {"name": "acme", "registryAccess": {"enabled": True, "registries": entries, **access}}]}))
        return str(path)
    return write
