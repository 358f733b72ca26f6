"""The local configuration: how this VM runs ramfw (TOML, every field has a working default).

Unknown sections or fields and wrong types are errors, never ignored: a typo in a security
setting must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
from .policy import DEFAULT_MAX_REGISTRIES, signature

DEFAULT_PATH = Path("/etc/ramfw/ramfw.toml")
MODES = ("enforce", "audit")
SIGNATURE_MODES = ("require", "warn", "off")
SCOPES = ("engine", "containers", "host")


@dataclass(frozen=True)
class PolicySettings:
    source: str = "/etc/ramfw/policy.json"
    cache: str = "/var/lib/ramfw/policy.json"
    refresh_interval: int = 300
    max_registries: int = DEFAULT_MAX_REGISTRIES
    ca_file: str = ""  # extra CA for an HTTPS source (a private PKI)
    signatures: str = "off"  # require | warn | off: minisign signatures (<source>.minisig)
    trusted_keys: tuple[str, ...] = ()  # minisign public keys (RWQ...) or absolute paths to .pub files
    refresh_jitter: float = 0.1  # each poll interval is refresh_interval times 1 +/- this, at random
    max_backoff: int = 3600  # seconds: the longest wait between polls when the source fails
    max_staleness: int = 86400  # seconds without a good answer from a URL source before status turns red

    def keys(self) -> tuple:
        """The trusted keys, parsed (``policy.signature.PublicKey``)."""
        return tuple(signature.load_key(entry, f"policy.trusted_keys[{i}]") for i, entry in enumerate(self.trusted_keys))


@dataclass(frozen=True)
class EnforcementSettings:
    mode: str = "enforce"
    scope: tuple[str, ...] = ("engine",)
    registry_ports: tuple[int, ...] = (80, 443, 5000)
    table: str = "ramfw"
    mark: int = 0x52410000
    mark_mask: int = 0xFFFF0000
    nflog_group: int = 5241
    engine_processes: tuple[str, ...] = ("dockerd", "containerd", "buildkitd")
    engine_executables: tuple[str, ...] = ()  # more trusted engine executables (root-owned), beside /usr/bin/...
    engine_cgroups: tuple[str, ...] = ()  # cgroup v2 paths marked beside those the engine processes are in
    engine_cgroup: str = ""  # one such path (older configurations)
    dedicated_cgroup: bool = False  # move an engine found in the root cgroup into its own
    bpffs: str = "/sys/fs/bpf"
    # The TLS server name check (issue #13): a flow's ClientHello to a learned address (through a
    # proxy, its CONNECT request) is read and its name matched against the allowlist too.
    tls_check: bool = True  # false: flows to learned addresses pass on their address alone
    tls_ports: tuple[int, ...] = (443,)  # TCP ports whose first flight is read; UDP to them (QUIC) is refused
    tls_queue_num: int = 5243  # the netfilter queue first flights wait in
    tls_syn_group: int = 5244  # the NFLOG group SYNs (where a stream begins) and refused QUIC are copied to
    tls_ct_mark: int = 0x00000100  # the conntrack mark bit of a flow waiting to be read; the next bit up: refused (both: its first flight went to the queue)
    proxies: tuple[str, ...] = ()  # the engine's explicit HTTP(S) proxies, "address:port": reachable in scope
    table_owner: bool = True  # own the table (owner + persist) where the kernel can: others cannot change it
    engine_socket: str = "/var/run/docker.sock"  # the engine's API: names the containers block events name

    @property
    def tls_mark_mask(self) -> int:
        return self.tls_ct_mark | self.tls_ct_mark << 1

    @property
    def configured_cgroups(self) -> tuple[str, ...]:
        return self.engine_cgroups + ((self.engine_cgroup,) if self.engine_cgroup else ())


@dataclass(frozen=True)
class DnsSettings:
    trusted_resolvers: tuple[str, ...] = ()
    ttl_min: int = 30
    ttl_max: int = 3600
    ttl_grace: int = 60
    max_addresses_per_name: int = 1000
    max_addresses: int = 100_000
    queue_num: int = 5241
    snoop_group: int = 5242
    hold: str = "auto"  # auto: the kernel's best; passive: copy replies, never hold them
    prefilter: bool = True  # hold only replies that may be for allowlisted names (eBPF), where possible
    pair_queries: bool = True  # a UDP reply teaches only if it answers a query copied on its way out


@dataclass(frozen=True)
class DaemonSettings:
    run_dir: str = "/run/ramfw"
    log_format: str = "text"  # or "json": one object per line, with a stable "event" name
    log_file: str = ""  # default stderr (journald under systemd); a file is rotated at log_max_bytes
    log_max_bytes: int = 10 << 20

    @property
    def socket(self) -> str:
        return f"{self.run_dir}/control.sock"

    @property
    def state_file(self) -> str:
        return f"{self.run_dir}/state.json"


@dataclass(frozen=True)
class MetricsSettings:
    textfile: str = ""  # a node_exporter textfile (…/ramfw.prom), written atomically
    listen: str = ""  # serve them over HTTP at this address:port ("127.0.0.1:9541")
    interval: int = 15  # seconds between two snapshots


@dataclass(frozen=True)
class Config:
    policy: PolicySettings = field(default_factory=PolicySettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    enforcement: EnforcementSettings = field(default_factory=EnforcementSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    path: str = "(defaults)"


def _section(cls, data: object, name: str, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: [{name}] has no setting {key!r}; known: {', '.join(known)}")
        default = known[key].default
        values[key] = _coerce(value, default, f"{where}: {name}.{key}")
    return cls(**values)


def _coerce(value: object, default: object, where: str):
    if isinstance(default, tuple):
        items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(items, list):
            raise ConfigError(f"{where} must be a list")
        kind = type(default[0]) if default else str
        for item in items:
            if not isinstance(item, kind) or isinstance(item, bool):
                raise ConfigError(f"{where}: {item!r} is not a {kind.__name__}")
        return tuple(items)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, type(default)):
        raise ConfigError(f"{where} must be a {type(default).__name__}, not {type(value).__name__}")
    return value


def split_proxy(entry: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``192.0.2.8:3128`` or ``[2001:db8::8]:3128``; ValueError when it is neither."""
    host, _, port = entry.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{entry!r} is not address:port")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def _validate(config: Config) -> Config:
    where = config.path
    e, d, p = config.enforcement, config.dns, config.policy
    if e.mode not in MODES:
        raise ConfigError(f"{where}: enforcement.mode is {e.mode!r}; use one of {', '.join(MODES)}")
    for scope in e.scope:
        if scope not in SCOPES:
            raise ConfigError(f"{where}: enforcement.scope {scope!r} is unknown; use {', '.join(SCOPES)}")
    for port in e.registry_ports:
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where}: enforcement.registry_ports: {port} is not a port")
    if not e.table.replace("_", "").replace("-", "").isalnum() or len(e.table) > 32:
        raise ConfigError(f"{where}: enforcement.table {e.table!r}: use letters, digits, - and _")
    for name in ("mark", "mark_mask"):
        if not 0 < getattr(e, name) <= 0xFFFFFFFF:
            raise ConfigError(f"{where}: enforcement.{name} must be a 32-bit value other than 0")
    if e.mark & ~e.mark_mask:
        raise ConfigError(f"{where}: enforcement.mark has bits outside enforcement.mark_mask")
    for entry in e.proxies:
        try:
            split_proxy(entry)
        except ValueError:
            raise ConfigError(f"{where}: enforcement.proxies: {entry!r} is not address:port (an IP address: "
                              "a proxy's name would itself need resolving)") from None
    for path in e.engine_executables:
        if not path.startswith("/"):
            raise ConfigError(f"{where}: enforcement.engine_executables: {path!r} is not an absolute path")
    if not all(0 <= n <= 65535 for n in (e.nflog_group, d.queue_num, d.snoop_group)):
        raise ConfigError(f"{where}: nflog_group, queue_num and snoop_group are 16-bit numbers")
    if e.nflog_group == d.snoop_group:
        raise ConfigError(f"{where}: enforcement.nflog_group and dns.snoop_group must differ")
    if d.hold not in ("auto", "passive"):
        raise ConfigError(f"{where}: dns.hold is {d.hold!r}; use auto or passive")
    if not 0 < d.ttl_min <= d.ttl_max:
        raise ConfigError(f"{where}: dns.ttl_min must be positive and at most dns.ttl_max")
    if d.ttl_grace < 0 or d.max_addresses_per_name < 1 or d.max_addresses < 1:
        raise ConfigError(f"{where}: dns.ttl_grace, max_addresses_per_name and max_addresses must be positive")
    for resolver in d.trusted_resolvers:
        try:
            ipaddress.ip_address(resolver)
        except ValueError:
            raise ConfigError(f"{where}: dns.trusted_resolvers: {resolver!r} is not an IP address") from None
    if p.max_registries < 1 or p.refresh_interval < 1:
        raise ConfigError(f"{where}: policy.max_registries and policy.refresh_interval must be positive")
    _validate_policy_source(p, where)
    if config.daemon.log_format not in ("text", "json"):
        raise ConfigError(f"{where}: daemon.log_format is {config.daemon.log_format!r}; use text or json")
    if config.daemon.log_max_bytes < 4096:
        raise ConfigError(f"{where}: daemon.log_max_bytes must be at least 4096")
    m = config.metrics
    if m.textfile and not (m.textfile.startswith("/") and m.textfile.endswith(".prom")):
        raise ConfigError(f"{where}: metrics.textfile {m.textfile!r}: an absolute path ending in .prom (node_exporter "
                          "reads only those)")
    try:
        if m.listen:
            split_proxy(m.listen)
    except ValueError:
        raise ConfigError(f"{where}: metrics.listen {m.listen!r} is not address:port (an IP address)") from None
    if m.interval < 1:
        raise ConfigError(f"{where}: metrics.interval must be positive")
    _validate_tls(config, where)
    return config


def _validate_tls(config: Config, where: str) -> None:
    e = config.enforcement
    if not e.tls_ports or not all(1 <= port <= 65535 for port in e.tls_ports):
        raise ConfigError(f"{where}: enforcement.tls_ports must list ports from 1 to 65535")
    if not (0 <= e.tls_queue_num <= 65535 and 0 <= e.tls_syn_group <= 65535) or e.tls_queue_num == config.dns.queue_num \
            or e.tls_syn_group in (config.dns.snoop_group, e.nflog_group):
        raise ConfigError(f"{where}: enforcement.tls_queue_num and tls_syn_group are 16-bit numbers of their own (not "
                          "dns.queue_num, dns.snoop_group or enforcement.nflog_group)")
    if e.tls_ct_mark <= 0 or e.tls_ct_mark & (e.tls_ct_mark - 1) or e.tls_ct_mark >= 1 << 31:
        raise ConfigError(f"{where}: enforcement.tls_ct_mark is one bit of the conntrack mark, below 0x80000000 (the "
                          "next bit up is taken too)")


def _validate_policy_source(p: PolicySettings, where: str) -> None:
    if p.signatures not in SIGNATURE_MODES:
        raise ConfigError(f"{where}: policy.signatures is {p.signatures!r}; use one of {', '.join(SIGNATURE_MODES)}")
    if p.signatures != "off" and not p.trusted_keys:
        raise ConfigError(f"{where}: policy.signatures = {p.signatures!r} needs at least one minisign public key "
                          "in policy.trusted_keys")
    try:
        p.keys()
    except signature.SignatureError as err:
        raise ConfigError(f"{where}: {err}") from None
    if p.source.startswith("http://") and p.signatures != "require":
        raise ConfigError(f"{where}: policy.source {p.source!r} is plain HTTP: anyone on the path could serve a "
                          "policy; use https://, or set policy.signatures = \"require\" (with trusted keys)")
    if "://" in p.source and not p.source.startswith(("https://", "http://")):
        raise ConfigError(f"{where}: policy.source {p.source!r}: a URL source is https:// (or http:// with "
                          "policy.signatures = \"require\")")
    if not 0 <= p.refresh_jitter <= 0.5:
        raise ConfigError(f"{where}: policy.refresh_jitter is a fraction of refresh_interval from 0 to 0.5")
    if p.max_backoff < 1 or p.max_staleness < 0:
        raise ConfigError(f"{where}: policy.max_backoff must be positive, policy.max_staleness positive or 0 (never "
                          "red)")


def from_text(text: str, where: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML: {err}") from None
    sections = {"policy": PolicySettings, "enforcement": EnforcementSettings, "dns": DnsSettings,
                "daemon": DaemonSettings, "metrics": MetricsSettings}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]; known: {', '.join(sections)}")
    parts = {name: _section(cls, data.get(name, {}), name, where) for name, cls in sections.items()}
    return _validate(Config(**parts, path=where))


def load(path: str | Path | None = None) -> Config:
    """The configuration at ``path``; the defaults when no path is given and none is installed."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config()
        path = DEFAULT_PATH
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the configuration: {getattr(err, 'strerror', None) or err}") from None
    return from_text(text, str(path))
