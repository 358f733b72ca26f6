"""Whether a policy may be accepted: its signature, its version and its expiry (pure).

A policy is accepted only if, in this order: its minisign signature is by a trusted key
(``policy.signatures = require``; ``warn`` accepts it anyway and says why; ``off`` does not
look); it validates; it has not expired; and its version is not older than the highest
version accepted before (the *floor*, persisted beside the cache by ``source``), nor the same
version with other content. Whatever is refused, the policy in force stays: the callers never
fall back to a wider policy, nor to none.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from dataclasses import dataclass

from ..errors import PolicyError
from . import Policy, from_text, signature


class RollbackError(PolicyError):
    """A policy older than one already accepted (a replay, or a publishing mistake)."""


class ExpiredError(PolicyError):
    """A policy whose ``expires`` has passed."""


@dataclass(frozen=True)
class Floor:
    """The highest version accepted so far, and the digest of what it was."""

    version: int = 0
    sha256: str = ""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def accept(data: bytes, signature_text: str | None, settings, floor: Floor, now: float, where: str,
           last_good: bool = False) -> Policy:
    """The policy in ``data``, with its signer (and, under ``warn``, why its signature was not
    good) — or PolicyError naming why it is refused. ``settings`` is ``config.PolicySettings``.
    ``last_good``: the cached copy already accepted; it stays in force when it has expired
    (status says so loudly) rather than giving way to nothing."""
    signer, notes = "", []
    if settings.signatures != "off":
        try:
            if signature_text is None:
                raise signature.SignatureError(f"{where}: no signature (minisign's {where}.minisig was not found)")
            signer = signature.verify(data, signature_text, settings.keys(), where)
        except signature.SignatureError as err:
            if settings.signatures == "require":
                raise signature.SignatureError(f"{err}; refused (policy.signatures = require)") from None
            notes.append(f"{err}; accepted all the same (policy.signatures = warn)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{where}: not UTF-8 text") from None
    policy = from_text(text, settings.max_registries, where)
    if policy.expires is not None and policy.expires <= now and not last_good:
        raise ExpiredError(f"{where}: version {policy.version} expired at {when(policy.expires)}; refused")
    if policy.version < floor.version:
        raise RollbackError(f"{where}: version {policy.version} is older than version {floor.version}, already "
                            "accepted; refused (a replayed policy, or publish it with a higher version)")
    if policy.version and policy.version == floor.version and floor.sha256 and digest(data) != floor.sha256:
        raise RollbackError(f"{where}: version {policy.version} was accepted before with other content; refused "
                            f"(publish the change as version {policy.version + 1})")
    return dataclasses.replace(policy, signer=signer, notes=policy.notes + tuple(notes))


def expired(policy: Policy, now: float) -> str:
    """Why the policy in force is out of date, or ""."""
    if policy.expires is not None and policy.expires <= now:
        return (f"the policy in force (version {policy.version}) expired at {when(policy.expires)}; it stays in "
                "force until a newer one is accepted")
    return ""
