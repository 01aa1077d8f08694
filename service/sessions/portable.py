"""Signed session state that clients can keep or move between servers.

A blob is base64url of: magic "SMRS", the HMAC-SHA256 of the rest, then the body: a
format byte, when it was issued (unix seconds, float64), the model version it belongs
to, then the session record without its owner and its rewind history. It carries no
owner: whoever presents it owns what is made of it. A blob whose signature does not
verify, that was made by another model, or that is older than the server's maximum age
is refused with a reason. For the book model a blob is about 1.6 KB of base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
from dataclasses import replace

from service.errors import InvalidState, StateModelMismatch
from service.sessions.state import SessionState

MAGIC = b"SMRS"
FORMAT = 2
_MAC = 32
_ISSUED = struct.Struct("<Bd")  # format, issued at


def _invalid(reason: str) -> InvalidState:
    return InvalidState(f"session state refused: {reason}", "state")


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def seal(
    state: SessionState, secret: bytes, model_version: str, issued: float | None = None
) -> str:
    # the owner stays on this side; rewind points stay in the store (a blob stays small)
    public = replace(state, owner="", model=model_version, history=[])
    version = model_version.encode()
    when = time.time() if issued is None else issued
    body = _ISSUED.pack(FORMAT, when) + bytes((len(version),)) + version + public.encode()
    return base64.urlsafe_b64encode(MAGIC + _mac(secret, body) + body).decode()


def unseal(
    blob: str,
    secret: bytes,
    model_version: str,
    layers: int,
    hidden: int,
    max_age_s: float,
    now: float | None = None,
) -> SessionState:
    try:
        raw = base64.urlsafe_b64decode(blob.encode())
    except (binascii.Error, ValueError) as exc:
        raise _invalid("not base64url") from exc
    if len(raw) < len(MAGIC) + _MAC + _ISSUED.size + 1 or not raw.startswith(MAGIC):
        raise _invalid("not a simmer session state")
    mac, body = raw[len(MAGIC) : len(MAGIC) + _MAC], raw[len(MAGIC) + _MAC :]
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise _invalid("signature does not verify (tampered, or signed by another server secret)")
    form, issued = _ISSUED.unpack_from(body)
    if form != FORMAT:
        raise _invalid(f"unknown format {form}")
    age = (time.time() if now is None else now) - issued
    if age > max_age_s:
        raise _invalid(f"it is {age:.0f} s old; this server accepts states up to {max_age_s:g} s")
    pos = _ISSUED.size
    version = body[pos + 1 : pos + 1 + body[pos]].decode()
    if version != model_version:
        raise StateModelMismatch(
            f"session state belongs to model {version}, this server runs {model_version}",
            "state",
        )
    try:
        state = SessionState.decode(body[pos + 1 + body[pos] :])
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise _invalid("corrupt record") from exc
    if state.h.shape != (layers, hidden):
        raise _invalid(f"state shape {state.h.shape} does not fit this model")
    return state
