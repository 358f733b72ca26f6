"""Detached policy signatures in minisign's format, verified with ``cryptography``'s Ed25519.

Admins sign with Debian's ``minisign`` (``minisign -S -s key -m policy.json`` writes
``policy.json.minisig``); ramfw only verifies. The formats, as minisign writes them:

- public key: a base64 line of ``"Ed"`` + key id (8 bytes) + Ed25519 public key (32 bytes),
  under an ``untrusted comment:`` line;
- signature: ``untrusted comment:``, base64 of algorithm (``"ED"``: the signature is of the
  file's BLAKE2b-512 digest, minisign's default; ``"Ed"``: of the file itself, its legacy
  format) + key id + Ed25519 signature (64 bytes); then ``trusted comment: <text>`` and base64
  of a global signature, by the same key, of the signature followed by that text.

A key id is shown as minisign shows it: the 8 bytes read as a little-endian number, in
upper-case hex without leading zeros (``4468A2580D9A982B``, ``29BAB4175B6B75E``). Nothing here is home-made cryptography: BLAKE2b comes
from hashlib, Ed25519 from ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError


class SignatureError(PolicyError):
    """A signature is missing, malformed, by a key not trusted, or does not verify."""


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    raw: bytes  # the 32 bytes of the Ed25519 public key


def key_id(keynum: bytes) -> str:
    return f"{int.from_bytes(keynum, 'little'):X}"  # as minisign prints it: no leading zeros


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} is not base64") from None
    if len(data) != size:
        raise SignatureError(f"{what} is {len(data)} bytes, not {size}: not minisign's format")
    return data


def parse_public_key(text: str, where: str = "public key") -> PublicKey:
    """A minisign public key: the base64 line alone (``RWQ...``, as ``minisign -P`` takes it)
    or the whole ``.pub`` file."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("untrusted comment:")]
    if len(lines) != 1:
        raise SignatureError(f"{where}: a minisign public key is one base64 line (RWQ...)")
    data = _b64(lines[0], 42, f"{where}")
    if data[:2] != b"Ed":
        raise SignatureError(f"{where}: not an Ed25519 minisign public key")
    return PublicKey(key_id(data[2:10]), data[10:])


def load_key(entry: str, where: str) -> PublicKey:
    """A configured trusted key: an absolute path to a ``.pub`` file, or the key itself."""
    if entry.startswith("/"):
        try:
            text = Path(entry).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SignatureError(f"{where}: cannot read {entry}: {getattr(err, 'strerror', None) or err}") from None
        return parse_public_key(text, f"{where}: {entry}")
    return parse_public_key(entry, where)


@dataclass(frozen=True)
class Signature:
    prehashed: bool
    key_id: str
    signature: bytes
    trusted_comment: str
    global_signature: bytes


def parse_signature(text: str, where: str = "signature") -> Signature:
    lines = text.splitlines()
    if len(lines) < 4 or not lines[0].startswith("untrusted comment:") or \
            not lines[2].startswith("trusted comment: "):
        raise SignatureError(f"{where}: not a minisign signature (four lines: untrusted comment, signature, "
                             "trusted comment, global signature)")
    data = _b64(lines[1], 74, f"{where}: the signature")
    if data[:2] not in (b"ED", b"Ed"):
        raise SignatureError(f"{where}: unknown signature algorithm {data[:2]!r}")
    return Signature(data[:2] == b"ED", key_id(data[2:10]), data[10:], lines[2][len("trusted comment: "):],
                     _b64(lines[3], 64, f"{where}: the global signature"))


def verify(message: bytes, signature_text: str, keys: tuple[PublicKey, ...], where: str = "signature") -> str:
    """The id of the trusted key that signed ``message``; SignatureError otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    sig = parse_signature(signature_text, where)
    key = next((k for k in keys if k.key_id == sig.key_id), None)
    if key is None:
        trusted = ", ".join(k.key_id for k in keys) or "none"
        raise SignatureError(f"{where}: signed by key {sig.key_id}, which is not trusted (policy.trusted_keys: "
                             f"{trusted})")
    public = Ed25519PublicKey.from_public_bytes(key.raw)
    signed = hashlib.blake2b(message, digest_size=64).digest() if sig.prehashed else message
    try:
        public.verify(sig.signature, signed)
        public.verify(sig.global_signature, sig.signature + sig.trusted_comment.encode("utf-8"))
    except InvalidSignature:
        raise SignatureError(f"{where}: the signature by key {sig.key_id} does not verify: the policy or its "
                             "signature was changed") from None
    return sig.key_id
