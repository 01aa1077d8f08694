"""Incremental detokenisation with stop strings: the text a request's tokens make."""

from __future__ import annotations

from dataclasses import dataclass, field

from simmer.tokenizer import Tokenizer


@dataclass
class TextStream:
    """Incremental detokenisation with stop strings, one request's `check`."""

    tokenizer: Tokenizer
    prev: int | None  # the two tokens before the next one, oldest first, for spacing
    last: int | None
    stop: tuple[str, ...]
    text: str = ""
    ends: list[int] = field(default_factory=list)  # the text's length after each token
    cut: int | None = None  # where a stop string begins

    def add(self, token: int) -> str | None:
        piece = self.tokenizer.piece(self.prev, self.last, token)
        self.prev, self.last = self.last, token
        self.text += piece
        self.ends.append(len(self.text))
        if self.stop:
            window = max(map(len, self.stop)) + len(piece)
            start = max(0, len(self.text) - window)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.cut = min(hits)
                return "stop"
        return None

    def safe_length(self, done: bool) -> int:
        """How much text may be shown: all when done, else all but a possible stop prefix."""
        if self.cut is not None:
            return self.cut
        if done or not self.stop:
            return len(self.text)
        hold = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return len(self.text) - hold
