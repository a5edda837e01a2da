"""API keys: creation, revocation, verification.

A key looks like ``fpk_<id>_<secret>``: ``id`` (8 hex digits) is public and names the key
in the database, ``secret`` holds 256 bits from :mod:`secrets`. Only the sha256 digest of
the whole key is stored; verification looks the row up by id and compares digests with
:func:`hmac.compare_digest` (constant time). A key is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from .db import Database, KeyRow

__all__ = ["KEY_PREFIX", "ApiKey", "create_key", "hash_key", "list_keys", "revoke_key",
           "verify_key"]

KEY_PREFIX = "fpk"
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{20,128}})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class ApiKey:
    """An API key's public record (never the secret)."""

    id: str
    name: str
    is_admin: bool
    created: str
    revoked: str | None

    @classmethod
    def from_row(cls, row: KeyRow) -> ApiKey:
        return cls(id=row["id"], name=row["name"], is_admin=bool(row["is_admin"]),
                   created=row["created"], revoked=row["revoked"])


def hash_key(token: str) -> str:
    """sha256 hex digest of a key."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_key(db: Database, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """Create a key called ``name``; returns its record and the key itself (store it: it
    cannot be recovered). Names are unique, 1-64 characters of ``A-Za-z0-9._@-``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"key name {name!r} is invalid: use 1-64 characters of letters, "
                         "digits, '.', '_', '@' or '-', starting with a letter or digit")
    if db.find_key(name) is not None:
        raise ValueError(f"a key named {name!r} already exists")
    for _ in range(16):
        key_id = secrets.token_hex(4)
        if db.get_key(key_id) is None:
            break
    else:  # pragma: no cover - 2**32 ids
        raise RuntimeError("could not draw an unused key id")
    token = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = db.insert_key(key_id, name, hash_key(token), admin)
    return ApiKey.from_row(row), token


def verify_key(db: Database, token: str | None) -> ApiKey | None:
    """The active key matching ``token``, or None (missing, malformed, unknown, wrong
    secret or revoked)."""
    if not token:
        return None
    match = _KEY_RE.match(token.strip())
    if match is None:
        return None
    row = db.get_key(match.group(1))
    # compare against a dummy digest when the id is unknown so both paths cost the same
    stored = row["hash"] if row else "0" * 64
    ok = hmac.compare_digest(hash_key(token.strip()), stored)
    if not ok or row is None or row["revoked"]:
        return None
    return ApiKey.from_row(row)


def revoke_key(db: Database, name_or_id: str) -> ApiKey:
    """Revoke the key with this name or id (ValueError if there is none)."""
    row = db.find_key(name_or_id)
    if row is None:
        raise ValueError(f"no API key named or with id {name_or_id!r}")
    db.revoke_key(row["id"])
    return ApiKey.from_row(db.get_key(row["id"]) or row)


def list_keys(db: Database) -> list[ApiKey]:
    """Every key, active or revoked, oldest first."""
    return [ApiKey.from_row(r) for r in db.list_keys()]
