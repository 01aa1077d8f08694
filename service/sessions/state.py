"""A session's state, and its compact binary form.

A session is the LSTM state (h, C) after every token it has *fed*, plus the pending
token: the last one generated but not fed yet. Continuing a session feeds the pending
token and the new prompt in one call, so history is never re-read. Both stores keep
sessions in the same binary form: about 1 KiB for the book model.
"""

from __future__ import annotations

import secrets
import struct
import time
from dataclasses import dataclass, field

import numpy as np

NO_TOKEN = -1
_MAGIC = b"SMR1"
# magic, layers, hidden, pending, prev, last, n_tokens, created, last_used
_HEADER = struct.Struct("<4sHHiiiqdd")


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_hex(16)


@dataclass
class SessionState:
    h: np.ndarray  # (L, H) float32
    c: np.ndarray  # (L, H) float32
    pending: int = NO_TOKEN  # generated, not yet fed (then it is also `last`)
    prev: int = NO_TOKEN  # the second-to-last token of the context, for spacing text
    last: int = NO_TOKEN  # the last token of the context
    n_tokens: int = 0  # tokens in the session's context so far (prompt and generated)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    owner: str = ""  # who may use the session (a key fingerprint); "" when keys are off
    model: str = ""  # the model version the state belongs to

    @classmethod
    def fresh(cls, layers: int, hidden: int, owner: str = "", model: str = "") -> SessionState:
        zeros = np.zeros((layers, hidden), np.float32)
        return cls(h=zeros, c=zeros.copy(), owner=owner, model=model)

    def encode(self) -> bytes:
        layers, hidden = self.h.shape
        owner = self.owner.encode()
        model = self.model.encode()
        header = _HEADER.pack(
            _MAGIC,
            layers,
            hidden,
            self.pending,
            self.prev,
            self.last,
            self.n_tokens,
            self.created,
            self.last_used,
        )
        return b"".join(
            (
                header,
                bytes((len(owner),)),
                owner,
                bytes((len(model),)),
                model,
                np.ascontiguousarray(self.h, np.float32).tobytes(),
                np.ascontiguousarray(self.c, np.float32).tobytes(),
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        magic, layers, hidden, pending, prev, last, n_tokens, created, last_used = (
            _HEADER.unpack_from(data)
        )
        if magic != _MAGIC:
            raise ValueError("not a simmer session record")
        pos = _HEADER.size
        owner_len = data[pos]
        owner = data[pos + 1 : pos + 1 + owner_len].decode()
        pos += 1 + owner_len
        model_len = data[pos]
        model = data[pos + 1 : pos + 1 + model_len].decode()
        pos += 1 + model_len
        size = layers * hidden * 4
        if len(data) != pos + 2 * size:
            raise ValueError("truncated session record")
        h = np.frombuffer(data, np.float32, layers * hidden, pos).reshape(layers, hidden).copy()
        c = (
            np.frombuffer(data, np.float32, layers * hidden, pos + size)
            .reshape(layers, hidden)
            .copy()
        )
        return cls(h, c, pending, prev, last, n_tokens, created, last_used, owner, model)
