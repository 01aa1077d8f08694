"""Signed session state that clients can keep or move between servers.

A blob is base64url of: magic "SMRS", a format byte, the HMAC-SHA256 of the rest, the
model version it belongs to, then the session record. It carries no owner: whoever
imports it owns the new session. A blob whose signature does not verify, or that was
made by another model, is refused with a reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import replace

from service.errors import InvalidState, StateModelMismatch
from service.sessions.state import SessionState

MAGIC = b"SMRS"
FORMAT = 1
_MAC = 32


def _invalid(reason: str) -> InvalidState:
    return InvalidState(f"session state refused: {reason}", "state")


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def seal(state: SessionState, secret: bytes, model_version: str) -> str:
    public = replace(state, owner="", model=model_version)  # the owner stays on this side
    version = model_version.encode()
    body = bytes((FORMAT, len(version))) + version + public.encode()
    return base64.urlsafe_b64encode(MAGIC + _mac(secret, body) + body).decode()


def unseal(blob: str, secret: bytes, model_version: str, layers: int, hidden: int) -> SessionState:
    try:
        raw = base64.urlsafe_b64decode(blob.encode())
    except (binascii.Error, ValueError) as exc:
        raise _invalid("not base64url") from exc
    if len(raw) < len(MAGIC) + _MAC + 2 or not raw.startswith(MAGIC):
        raise _invalid("not a simmer session state")
    mac, body = raw[len(MAGIC) : len(MAGIC) + _MAC], raw[len(MAGIC) + _MAC :]
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise _invalid("signature does not verify (tampered, or signed by another server secret)")
    if body[0] != FORMAT:
        raise _invalid(f"unknown format {body[0]}")
    version = body[2 : 2 + body[1]].decode()
    if version != model_version:
        raise StateModelMismatch(
            f"session state belongs to model {version}, this server runs {model_version}",
            "state",
        )
    try:
        state = SessionState.decode(body[2 + body[1] :])
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid("corrupt record") from exc
    if state.h.shape != (layers, hidden):
        raise _invalid(f"state shape {state.h.shape} does not fit this model")
    return state
