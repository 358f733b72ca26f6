"""Speak the registry protocol as the engine would, and write down every host it touches.

For one image: ``GET /v2/`` on the registry (the challenge), the token endpoint its
``WWW-Authenticate: Bearer realm=...`` names (often another host: ``auth.docker.io``), the
manifest with the Accept types the engine sends (for an index, the VM's platform's manifest),
then one blob, the config (the smallest), fetched with redirects recorded hop by hop and
followed up to ``MAX_REDIRECTS``, as Go's client follows them, without the registry's
Authorization on another host. Nothing of a blob's body is read.

Names are resolved through the resolvers ramfw trusts (``dns.trusted_resolvers``, else
resolv.conf's): the lookups are the kind the kernel learns from, as the engine's are. TLS
trusts the system store plus the engine's per-registry CAs, ``<certs.d>/<registry>/*.crt``
(and client certificates ``*.cert`` with ``*.key``), for every hop of the pull, as dockerd
does: the transport of a registry follows its redirects.

Everything is bounded: ``BUDGET`` seconds per image, ``TIMEOUT`` per connection, bodies of
``MAX_BODY``. What comes back is plain data (JSON over the control socket when the daemon
probes): query strings (signed URLs) and credentials are never in it.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import platform
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from .credentials import Login
from .reference import Reference, is_address, parse

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
CERTS_DIR = "/etc/docker/certs.d"
MAX_REDIRECTS = 5
MAX_BODY = 4 << 20
TIMEOUT = 10.0
BUDGET = 30.0
MAX_IMAGES = 20
_ARCHITECTURES = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", "v8"),
                  "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
                  "i686": ("386", ""), "i386": ("386", ""), "ppc64le": ("ppc64le", ""),
                  "s390x": ("s390x", ""), "riscv64": ("riscv64", "")}
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|\Z)')


@dataclass
class Step:
    """One request of the pull: where it went and what came back (``error``: it got no answer)."""

    role: str  # registry, token, blob, redirect
    host: str
    port: int
    path: str
    status: int = 0
    error: str = ""
    address: str = ""
    addresses: tuple[str, ...] = ()
    location: str = ""  # a redirect's target, without its query


class Failed(Exception):
    """The probe cannot go on: the pull would fail here too, or this is as far as it could see."""


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://auth.example/token",service="x"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        found = _PARAM.match(rest, position)
        if not found:
            break
        params[found[1].lower()] = re.sub(r"\\(.)", r"\1", found[2]) if found[2] is not None else found[3]
        position = found.end()
    return scheme.lower(), params


def vm_platform(machine: str | None = None) -> tuple[str, str, str]:
    """(os, architecture, variant) of this VM in the OCI's words."""
    machine = machine or platform.machine()
    arch, variant = _ARCHITECTURES.get(machine, (machine, ""))
    return "linux", arch, variant


def pick_platform(index: dict, wanted: tuple[str, str, str]) -> dict | None:
    """The descriptor an engine on ``wanted`` pulls from an index: the same OS and architecture,
    the same variant preferred (arm64's v8 and none are one), attestations never."""
    os_name, arch, variant = wanted
    candidates = [m for m in index.get("manifests") or [] if isinstance(m, dict)
                  and isinstance(m.get("platform"), dict) and m["platform"].get("os") == os_name
                  and m["platform"].get("architecture") == arch]

    def rank(descriptor: dict) -> int:
        got = descriptor["platform"].get("variant", "")
        same = got == variant or (arch == "arm64" and {got, variant} <= {"", "v8"})
        return 0 if same else 1 if not got else 2
    return min(candidates, key=rank) if candidates else None


def tls_context(reference: Reference, certs_dir: str = CERTS_DIR) -> tuple[ssl.SSLContext, str]:
    """The system store plus the engine's files for this registry, and which were read."""
    context = ssl.create_default_context()
    used = []
    names = dict.fromkeys([reference.domain.lower(), reference.host if reference.port == 443
                           else f"{reference.host}:{reference.port}"])
    for name in names:
        directory = Path(certs_dir) / name
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.crt")):
            context.load_verify_locations(cafile=str(path))
            used.append(str(path))
        for cert in sorted(directory.glob("*.cert")):
            key = cert.with_suffix(".key")
            if key.exists():
                context.load_cert_chain(str(cert), str(key))
                used.append(str(cert))
    return context, "the system store" + (" and " + ", ".join(used) if used else "")


class Resolver:
    """A and AAAA through the given resolvers (dnspython follows CNAMEs), once per host."""

    def __init__(self, nameservers: list[str], timeout: float = 3.0):
        import dns.resolver

        self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.nameservers = list(nameservers)
        self.timeout = timeout
        self._found: dict[str, tuple[str, ...]] = {}

    def addresses(self, host: str, deadline: float | None = None) -> tuple[str, ...]:
        if host in self._found:
            return self._found[host]
        if is_address(host):
            return (host,)
        if host == "localhost":
            return ("127.0.0.1", "::1")
        import dns.exception

        if not self._resolver.nameservers:
            raise Failed("no DNS resolver is trusted (dns.trusted_resolvers is empty and resolv.conf names none)")
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            lifetime = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
            if lifetime <= 0:
                break
            try:
                found += [str(ipaddress.ip_address(record.address))
                          for record in self._resolver.resolve(host, rdtype, search=False, lifetime=lifetime)]
            except dns.exception.DNSException:
                continue
        if not found:
            raise Failed(f"{host} has no address (asked {', '.join(self._resolver.nameservers)})")
        self._found[host] = tuple(found)
        return self._found[host]


def _why(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS: the certificate is not trusted ({err.verify_message})"
    if isinstance(err, ssl.SSLError):
        return f"TLS failed: {err.reason or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out"
    return str(err) or type(err).__name__


class Probe:
    """One image's pull, as far as it goes; ``steps`` says what it touched."""

    def __init__(self, reference: Reference, login: Login, resolver: Resolver, context: ssl.SSLContext,
                 budget: float = BUDGET, wanted: tuple[str, str, str] | None = None):
        self.reference, self.login, self.resolver, self.context = reference, login, resolver, context
        self.deadline = time.monotonic() + budget
        self.wanted = wanted or vm_platform()
        self.steps: list[Step] = []
        self.auth = ""  # the Authorization header for the registry

    # -- one request ------------------------------------------------------------------------
    def _connect(self, scheme: str, host: str, port: int, step: Step) -> http.client.HTTPConnection:
        try:
            step.addresses = self.resolver.addresses(host, self.deadline)
        except Failed as err:
            step.error = str(err)
            raise
        failure: BaseException | None = None
        for address in step.addresses:
            timeout = min(TIMEOUT, self.deadline - time.monotonic())
            if timeout <= 0:
                failure = TimeoutError()
                break
            try:
                sock = socket.create_connection((address, port), timeout=timeout)
            except OSError as err:
                failure = err
                continue
            step.address = address
            try:
                if scheme == "https":
                    sock = self.context.wrap_socket(sock, server_hostname=host)
            except OSError as err:
                sock.close()
                failure = err
                break
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.default_port = 443 if scheme == "https" else 80  # for its Host header; the socket is ours
            conn.sock = sock
            return conn
        step.error = _why(failure or OSError("no address to connect to"))
        raise Failed(f"{host}: {step.error}")

    def request(self, url: str, role: str, headers: dict[str, str], body: bool = True,
                login_to: tuple[str, int] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """GET ``url``, its redirects followed and each recorded (``redirect``); Authorization
        goes only to ``login_to`` (the registry by default), never to a host a redirect names.
        Returns the last answer."""
        login_to = login_to or (self.reference.host, self.reference.port)
        for hop in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise Failed(f"cannot follow {parts.scheme}:// to {parts.hostname or url[:80]!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            step = Step(role if hop == 0 else "redirect", parts.hostname.lower(), port, parts.path or "/")
            self.steps.append(step)
            conn = self._connect(parts.scheme, step.host, port, step)
            sock = conn.sock  # the response reads from it after the connection lets go of it
            try:
                sent = dict(headers)
                if (step.host, port) != login_to:
                    sent.pop("Authorization", None)
                conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                             headers={"User-Agent": f"ramfw-check/{__version__}", **sent})
                response = conn.getresponse()
                step.status = response.status
                location = response.getheader("Location")
                if response.status in (301, 302, 303, 307, 308) and location:
                    url = urllib.parse.urljoin(url, location)
                    target = urllib.parse.urlsplit(url)
                    step.location = urllib.parse.urlunsplit((target.scheme, target.netloc, target.path, "", ""))
                    continue
                data = self._read(response, sock) if body else b""
                return response.status, response.headers, data
            except (OSError, http.client.HTTPException) as err:
                step.error = _why(err)
                raise Failed(f"{step.host}: {step.error}") from None
            finally:
                conn.close()
        raise Failed(f"more than {MAX_REDIRECTS} redirects")

    def _read(self, response: http.client.HTTPResponse, sock: socket.socket) -> bytes:
        """The body, ``MAX_BODY`` at most, within the image's budget (a server that trickles
        bytes would otherwise hold the probe, in the daemon a thread, for as long as it likes)."""
        data = bytearray()
        while len(data) < MAX_BODY:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            sock.settimeout(min(TIMEOUT, remaining))
            chunk = response.read1(min(65536, MAX_BODY - len(data)))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    # -- the pull -----------------------------------------------------------------------------
    def _base(self) -> str:
        host = f"[{self.reference.host}]" if ":" in self.reference.host else self.reference.host
        return f"https://{host}" + ("" if self.reference.port == 443 else f":{self.reference.port}")

    def _authenticate(self) -> None:
        status, headers, _ = self.request(self._base() + "/v2/", "registry", {})
        if status == 200:
            return
        if status != 401:
            raise Failed(f"the registry answered {status} to /v2/: not a registry API")
        scheme, params = challenge(headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not self.login.basic:
                raise Failed("the registry asks for a login (Basic) and check has none")
            self.auth = f"Basic {self.login.basic}"
            return
        if scheme != "bearer" or not params.get("realm"):
            raise Failed(f"the registry's challenge {headers.get('WWW-Authenticate', '')[:80]!r} is not one "
                         "check understands")
        query = {"scope": f"repository:{self.reference.repository}:pull",
                 **({"service": params["service"]} if "service" in params else {})}
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        realm_parts = urllib.parse.urlsplit(url)
        login = {"Authorization": f"Basic {self.login.basic}"} if self.login.basic else {}
        status, _, data = self.request(url, "token", login, login_to=(
            (realm_parts.hostname or "").lower(), realm_parts.port or 443))
        if status != 200:
            raise Failed(f"the token endpoint answered {status}" + ("" if self.login.basic else " (anonymous)"))
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token:
            raise Failed("the token endpoint's answer has no token")
        self.auth = f"Bearer {token}"

    def _manifest(self, ref: str) -> tuple[str, dict]:
        headers = {"Accept": ", ".join(MANIFEST_TYPES), **({"Authorization": self.auth} if self.auth else {})}
        url = f"{self._base()}/v2/{self.reference.repository}/manifests/{ref}"
        status, answer, data = self.request(url, "registry", headers)
        if status != 200:
            raise Failed(f"the registry answered {status} for the manifest {ref}"
                         + (": no such image, or it needs a login" if status in (401, 403, 404) else ""))
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise Failed(f"the manifest {ref} is not JSON") from None
        if not isinstance(document, dict):
            raise Failed(f"the manifest {ref} is not a JSON object")
        kind = (answer.get("Content-Type") or "").split(";")[0].strip() or document.get("mediaType", "")
        return kind, document

    def run(self) -> str:
        """The config blob's digest once its answer came; Failed says where it stopped."""
        self._authenticate()
        kind, document = self._manifest(self.reference.manifest)
        if kind in INDEX_TYPES or "manifests" in document:
            chosen = pick_platform(document, self.wanted)
            if chosen is None or not isinstance(chosen.get("digest"), str):
                raise Failed(f"the index has no manifest for {'/'.join(p for p in self.wanted if p)}")
            kind, document = self._manifest(chosen["digest"])
        config = document.get("config") if isinstance(document.get("config"), dict) else {}
        layers = document.get("fsLayers") if isinstance(document.get("fsLayers"), list) else []
        digest = config.get("digest") or (layers[0].get("blobSum") if layers and isinstance(layers[0], dict) else None)
        if not isinstance(digest, str) or not digest:
            raise Failed("the manifest names no blob")
        headers = {"Authorization": self.auth} if self.auth else {}
        status, _, _ = self.request(f"{self._base()}/v2/{self.reference.repository}/blobs/{digest}", "blob",
                                    headers, body=False)
        if not 200 <= status < 300:
            raise Failed(f"{self.steps[-1].host} answered {status} for the blob")
        return digest


def probe(text: str, login: Login, nameservers: list[str], certs_dir: str = CERTS_DIR,
          budget: float = BUDGET, by: str = "ramfw check", resolver: Resolver | None = None) -> dict:
    """One image, probed; plain data (``verdict`` reads it)."""
    reference = parse(text)
    result = {"reference": reference.to_text(), "registry": reference.host, "port": reference.port,
              "domain": reference.domain, "login": login.how, "by": by, "complete": False, "error": "",
              "platform": "/".join(p for p in vm_platform() if p)}
    try:
        context, result["trust"] = tls_context(reference, certs_dir)
    except (OSError, ssl.SSLError) as err:
        result["error"] = f"the engine's certificates for {reference.domain} cannot be read: {_why(err)}"
        result["steps"] = []
        return result
    attempt = Probe(reference, login, resolver or Resolver(nameservers), context, budget)
    try:
        result["blob"] = attempt.run()
        result["complete"] = True
    except Failed as err:
        result["error"] = str(err)
    result["steps"] = [asdict(step) for step in attempt.steps]
    return result


def probe_all(images: list[str], logins: dict[str, dict], nameservers: list[str], certs_dir: str = CERTS_DIR,
              by: str = "ramfw check") -> list[dict]:
    """Each image in turn (``logins``: image -> ``Login`` fields, from the caller's config.json)."""
    if len(images) > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} images at once")
    return [probe(image, Login(**logins.get(image, {})), nameservers, certs_dir, by=by) for image in images]
