"""The engine's stored logins: ``auths`` in the Docker client's ``config.json``.

``docker login`` keeps ``base64(user:password)`` there unless a credential helper holds it
(``credsStore``, ``credHelpers``): ``check`` runs no helper (it would run a program the
configuration names, as root), and then probes anonymously, saying so. An ``identitytoken``
(an OAuth refresh token) is not used either. Secrets are passed to the probe, never printed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .reference import DOCKER_HUB, Reference

DOCKER_HUB_KEY = "https://index.docker.io/v1/"  # where docker login keeps Docker Hub's


@dataclass(frozen=True)
class Login:
    """What the probe may use for a registry: ``basic`` (base64 user:password) or nothing, and
    why, in words that name no secret."""

    basic: str = ""
    how: str = "anonymous"


def config_path(environ: dict | None = None, home: str | None = None) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``, as the docker CLI reads."""
    environ = os.environ if environ is None else environ
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]) / "config.json"
    return Path(home or os.path.expanduser("~")) / ".docker" / "config.json"


def _key(entry: str) -> str:
    """A key of ``auths`` as a registry name: ``https://host:5000/v2/`` is ``host:5000``."""
    entry = entry.lower()
    for scheme in ("https://", "http://"):
        entry = entry.removeprefix(scheme)
    return entry.split("/", 1)[0]


def login_for(reference: Reference, config_text: str | None, where: str) -> Login:
    """The login for ``reference``'s registry in the config file's text (None: unreadable)."""
    if config_text is None:
        return Login(how=f"anonymous ({where} is not readable)")
    try:
        data = json.loads(config_text)
    except ValueError:
        return Login(how=f"anonymous ({where} is not valid JSON)")
    if not isinstance(data, dict):
        return Login(how=f"anonymous ({where} is not a JSON object)")
    wanted = {DOCKER_HUB, _key(DOCKER_HUB_KEY)} if reference.domain == DOCKER_HUB else {reference.domain.lower()}
    auths = data.get("auths") if isinstance(data.get("auths"), dict) else {}
    for key, entry in auths.items():
        if _key(str(key)) in wanted and isinstance(entry, dict):
            basic = entry.get("auth")
            if isinstance(basic, str) and basic and _decodes(basic):
                return Login(basic, f"the login for {key} in {where}")
            if entry.get("identitytoken"):
                return Login(how=f"anonymous (the login for {key} in {where} is an identity token, which check "
                                 "does not use)")
    helpers = data.get("credHelpers") if isinstance(data.get("credHelpers"), dict) else {}
    helper = next((h for k, h in helpers.items() if _key(str(k)) in wanted), None) or data.get("credsStore")
    if helper:
        return Login(how=f"anonymous (the login is kept by docker-credential-{helper}, which check does not run)")
    return Login(how="anonymous")


def _decodes(basic: str) -> bool:
    try:
        return b":" in base64.b64decode(basic, validate=True)
    except (binascii.Error, ValueError):
        return False


def read(reference: Reference, path: Path | None = None) -> Login:
    path = path or config_path()
    try:
        text: str | None = path.read_text()
    except FileNotFoundError:  # never logged in: anonymous, nothing to say
        text = "{}"
    except (OSError, UnicodeDecodeError):
        text = None
    return login_for(reference, text, str(path))
