"""Sampling heads over graphs built the way the export builds them, for any vocabulary."""

from __future__ import annotations

from typing import Any

from export.graphs import block_params, direct_graph, envelope_graph
from service.engine.head import SamplingHead
from simmer.ort import open_session

OPSET = 17


def sampling_head(vocab: int, **options: Any) -> SamplingHead:
    """The head the service would open for a bundle of `vocab` words."""
    params = block_params(vocab)
    width, exact = params["width"], params["exact_blocks"]
    envelope = envelope_graph(vocab, width, exact, OPSET).SerializeToString()
    direct = direct_graph(vocab, width, OPSET).SerializeToString()
    return SamplingHead(
        vocab, open_session(envelope), open_session(direct), width, exact, **options
    )
