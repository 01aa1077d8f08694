"""A session's state, and its compact binary form.

A session is the LSTM state (h, C) after every token it has *fed*, plus the pending
token: the last one generated but not fed yet. Continuing a session feeds the pending
token and the new prompt in one call, so history is never re-read. Both stores keep
sessions in the same binary form: about 1 KiB for the book model, plus about 1 KiB for
each call start it keeps for rewinding (`Snapshot`, the last `session_history` calls).
"""

from __future__ import annotations

import secrets
import struct
import time
from dataclasses import dataclass, field, replace

import numpy as np

NO_TOKEN = -1
_MAGIC_V1 = b"SMR1"  # without snapshots: still read, so a rolling upgrade loses nothing
_MAGIC = b"SMR2"
# magic, layers, hidden, pending, prev, last, n_tokens, created, last_used
_HEADER = struct.Struct("<4sHHiiiqdd")
# per snapshot: pending, prev, last, n_tokens (then h and c)
_SNAPSHOT = struct.Struct("<iiiq")


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Snapshot:
    """What a session was at the start of one call: all that rewinding to it needs."""

    h: np.ndarray  # (L, H) float32
    c: np.ndarray
    pending: int
    prev: int
    last: int
    n_tokens: int


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
    history: list[Snapshot] = field(default_factory=list)  # call starts, oldest first

    @classmethod
    def fresh(cls, layers: int, hidden: int, owner: str = "", model: str = "") -> SessionState:
        zeros = np.zeros((layers, hidden), np.float32)
        return cls(h=zeros, c=zeros.copy(), owner=owner, model=model)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.h, self.c, self.pending, self.prev, self.last, self.n_tokens)

    def remember(self, start: Snapshot, keep: int) -> None:
        """Record `start` (this session before a call) as the newest rewind point,
        keeping the newest `keep`."""
        self.history = [*self.history, start][-keep:] if keep > 0 else []

    def rewind(self, turns: int) -> None:
        """Go back to the start of the `turns`-th newest call, forgetting the calls since.
        The caller checks 1 <= turns <= len(history)."""
        point = self.history[-turns]
        self.h, self.c = point.h, point.c
        self.pending, self.prev, self.last = point.pending, point.prev, point.last
        self.n_tokens = point.n_tokens
        self.history = self.history[:-turns]

    def copy(self) -> SessionState:
        """An independent session with the same state and history (arrays are never
        written in place, so they are shared)."""
        return replace(self, history=list(self.history))

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
        parts = [
            header,
            bytes((len(owner),)),
            owner,
            bytes((len(model),)),
            model,
            _floats(self.h),
            _floats(self.c),
            bytes((len(self.history),)),
        ]
        for point in self.history:
            parts += [
                _SNAPSHOT.pack(point.pending, point.prev, point.last, point.n_tokens),
                _floats(point.h),
                _floats(point.c),
            ]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        if len(data) < _HEADER.size + 2:
            raise ValueError("truncated session record")
        magic, layers, hidden, pending, prev, last, n_tokens, created, last_used = (
            _HEADER.unpack_from(data)
        )
        if magic not in (_MAGIC, _MAGIC_V1):
            raise ValueError("not a simmer session record")
        pos = _HEADER.size
        owner_len = data[pos]
        owner = data[pos + 1 : pos + 1 + owner_len].decode()
        pos += 1 + owner_len
        if len(data) <= pos:
            raise ValueError("truncated session record")
        model_len = data[pos]
        model = data[pos + 1 : pos + 1 + model_len].decode()
        pos += 1 + model_len
        shape = (layers, hidden)
        size = layers * hidden * 4
        if len(data) < pos + 2 * size:
            raise ValueError("truncated session record")
        h, c = _array(data, pos, shape), _array(data, pos + size, shape)
        pos += 2 * size
        history: list[Snapshot] = []
        if magic == _MAGIC:
            if len(data) <= pos:
                raise ValueError("truncated session record")
            count = data[pos]
            pos += 1
            if len(data) != pos + count * (_SNAPSHOT.size + 2 * size):
                raise ValueError("truncated session record")
            for _ in range(count):
                s_pending, s_prev, s_last, s_tokens = _SNAPSHOT.unpack_from(data, pos)
                pos += _SNAPSHOT.size
                s_h, s_c = _array(data, pos, shape), _array(data, pos + size, shape)
                pos += 2 * size
                history.append(Snapshot(s_h, s_c, s_pending, s_prev, s_last, s_tokens))
        elif len(data) != pos:
            raise ValueError("truncated session record")
        return cls(h, c, pending, prev, last, n_tokens, created, last_used, owner, model, history)


def _floats(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, np.float32).tobytes()


def _array(data: bytes, offset: int, shape: tuple[int, int]) -> np.ndarray:
    count = shape[0] * shape[1]
    return np.frombuffer(data, np.float32, count, offset).reshape(shape).copy()
