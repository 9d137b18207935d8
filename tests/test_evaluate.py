"""Bits per byte over overlapping (strided) and non-overlapping windows."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blt.training.data import Document, build_stream
from blt.training.evaluate import evaluate_stream, windows
from tests.helpers import TEXT, random_entropy_model


@given(st.integers(0, 3000), st.integers(1, 300), st.data())
def test_windows_score_every_prediction_once_with_its_context(stream_len, seq_len, data):
    context = data.draw(st.integers(0, seq_len - 1))
    scored = []
    for s, e, k in windows(stream_len, seq_len, context):
        assert 0 < e - s <= seq_len
        assert k == (0 if s == 0 else context)
        scored.extend(range(s + k, e))
    assert scored == list(range(max(stream_len - 1, 0)))  # each position with a target, once, in order


def test_windows_refuse_a_context_as_long_as_the_window():
    with pytest.raises(ValueError, match="context"):
        windows(100, 16, 16)


def test_strided_evaluation_equals_one_long_window_once_the_context_covers_the_reach():
    """The entropy model sees 2 layers x 15 bytes back; with at least 30 bytes of context every strided
    prediction is the one a single window over the whole stream makes, so the bits agree."""
    model = random_entropy_model(sliding_window=16, n_layers=2)
    stream = build_stream([Document("a", TEXT.encode()), Document("b", TEXT.encode()[::-1])])
    whole = evaluate_stream(model, stream, len(stream))
    strided = evaluate_stream(model, stream, 48, context=32, batch_size=3)
    plain = evaluate_stream(model, stream, 48)
    assert strided["n_bytes"] == whole["n_bytes"] == plain["n_bytes"]
    assert strided["bits"] == pytest.approx(whole["bits"], rel=1e-5)
    assert plain["bits"] != pytest.approx(whole["bits"], rel=1e-3)  # windows that start cold predict otherwise
