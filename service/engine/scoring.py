"""Echo scoring: the logprob of each token of a text given the tokens before it.

The bundle's `sequence_logprobs` graph (built and checked at export: `export.scoring`)
gives the log-softmax over the vocabulary after every position of a sequence. The
`Scorer` runs it in an onnxruntime session of its own. The decode engine never opens
that graph and never waits for it: model.onnx, which decode runs, still computes the
output layer at the last position only, and a `score` call touches nothing but the
scorer's session and its own arguments. onnxruntime sessions may be run from several
threads at once, so a caller runs `score` in a worker thread (`asyncio.to_thread`) and
the decode worker carries on beside it; with one intra-op thread (the default) scoring
takes at most one core.

For tokens t_0 .. t_{n-1} fed from a state (h, c), position i's distribution is that of
the word after t_i. `score` returns the logprob of the token that follows in the text
(t_{i+1}, for i < n - 1), the `top_k` likeliest words after every position (the last
one included: that is the distribution of the first generated word) and the state
after t_{n-1}, the state a session keeps. The logprob of t_0 itself belongs to the
distribution before it: a caller that has the token before t_0 puts it first.

Long texts are scored `chunk` tokens at a time, the state carried from one chunk to
the next, so memory stays at about chunk * V floats whatever the length; the export
proves that a cut changes nothing. A bundle without the graph gets no scorer
(`Scorer.from_bundle` returns None): the service then reports scoring unavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from simmer.bundle import SEQUENCE_LOGPROBS, ModelBundle
from simmer.ort import GraphLoadError, open_session

CHUNK = 512  # tokens per onnxruntime call: (1, 512, V) float32 is 20 MB for the book's model

logger = logging.getLogger(__name__)

_OUTPUTS = ["logprobs", "hn", "cn"]


@dataclass(frozen=True)
class Scores:
    """What `Scorer.score` gives for tokens t_0 .. t_{n-1} fed from a state."""

    next_logprobs: np.ndarray  # (n - 1,) float32: log p(t_{i+1} | state, t_0 .. t_i)
    top_ids: np.ndarray  # (n, k) int64: the k likeliest words after each position, likeliest first
    top_logprobs: np.ndarray  # (n, k) float32: their logprobs
    h: np.ndarray  # (L, H) float32: the state after t_{n-1}
    c: np.ndarray  # (L, H) float32


class Scorer:
    """The bundle's scoring graph in an onnxruntime session of its own. Thread-safe: it
    holds no state between calls."""

    def __init__(
        self,
        session: ort.InferenceSession,
        vocab_size: int,
        num_layers: int,
        hidden_size: int,
        chunk: int = CHUNK,
    ) -> None:
        """`session` runs a sequence_logprobs graph of these sizes."""
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, not {chunk}")
        self.session = session
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.chunk = chunk

    @classmethod
    def from_bundle(
        cls,
        bundle: ModelBundle,
        intra_op_threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        chunk: int = CHUNK,
    ) -> Scorer | None:
        """The scorer over the bundle's sequence_logprobs graph, warmed up; None where the
        bundle has no such graph or it cannot be opened (scoring is then unavailable)."""
        graph = bundle.graph(SEQUENCE_LOGPROBS)
        if graph is None:
            logger.warning("the bundle has no %s graph; scoring unavailable", SEQUENCE_LOGPROBS)
            return None
        try:
            session = open_session(graph.path, intra_op_threads, providers)
        except GraphLoadError:
            logger.warning("cannot open the %s graph", SEQUENCE_LOGPROBS, exc_info=True)
            return None
        scorer = cls(session, bundle.vocab_size, bundle.num_layers, bundle.hidden_size, chunk)
        scorer.warm_up()
        return scorer

    def zero_state(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.num_layers, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def warm_up(self) -> None:
        """One call, so the first request does not pay for the session's set-up."""
        self.score(*self.zero_state(), [1], top_k=1)

    def score(
        self,
        h: np.ndarray,
        c: np.ndarray,
        tokens: Sequence[int],
        top_k: int = 0,
        then: int | None = None,
    ) -> Scores:
        """Feed `tokens` from state (h, c), each (L, H): every next token's logprob, the
        `top_k` likeliest words after each position (every word when top_k is at least
        the vocabulary size) and the state after the last token. With `then`, the token
        that follows the text (not fed), its logprob is scored too: next_logprobs then
        has n entries. ValueError, with one line, for a state of the wrong shape, a token
        outside the vocabulary or a negative top_k."""
        ids = self._tokens(tokens)
        following_ids = ids if then is None else np.append(ids, self._tokens([then]))
        state_h, state_c = self._state(h, "h"), self._state(c, "c")
        if top_k < 0:
            raise ValueError(f"top_k must be at least 0, not {top_k}")
        k = min(top_k, self.vocab_size)
        n = len(ids)
        next_logprobs = np.empty(max(len(following_ids) - 1, 0), np.float32)
        top_ids = np.empty((n, k), np.int64)
        top_logprobs = np.empty((n, k), np.float32)
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            feeds = {"tokens": ids[None, start:stop], "h0": state_h, "c0": state_c}
            logprobs, state_h, state_c = self.session.run(_OUTPUTS, feeds)
            rows = logprobs[0]  # (T, V)
            following = following_ids[start + 1 : stop + 1]  # the token after each row
            next_logprobs[start : start + len(following)] = rows[
                np.arange(len(following)), following
            ]
            top_ids[start:stop], top_logprobs[start:stop] = _top(rows, k)
        return Scores(next_logprobs, top_ids, top_logprobs, state_h[:, 0], state_c[:, 0])

    def _tokens(self, tokens: Sequence[int]) -> np.ndarray:
        try:
            ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        except OverflowError:
            bad = next(t for t in tokens if not -(2**63) <= t < 2**63)
            raise ValueError(
                f"token {bad} is outside the vocabulary of {self.vocab_size} words"
            ) from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token {bad} is outside the vocabulary of {self.vocab_size} words")
        return ids

    def _state(self, x: np.ndarray, name: str) -> np.ndarray:
        """(L, H) -> (L, 1, H) float32, contiguous, as the graph takes it."""
        shape = (self.num_layers, self.hidden_size)
        if np.shape(x) != shape:
            raise ValueError(f"{name} has shape {list(np.shape(x))}, expected {list(shape)}")
        return np.ascontiguousarray(x, dtype=np.float32).reshape(shape[0], 1, shape[1])


def _top(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row (T, V) and their ids, largest first, equal values
    in id order (a tie at the k-th place may keep either word)."""
    if k == 0:
        return np.empty((len(rows), 0), np.int64), np.empty((len(rows), 0), np.float32)
    if k < rows.shape[1]:
        candidates = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
    values = np.take_along_axis(rows, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=1)  # by value descending, then by id
    ids = np.take_along_axis(candidates, order, axis=1)
    return ids, np.take_along_axis(values, order, axis=1)
