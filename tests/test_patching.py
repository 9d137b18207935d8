import pytest
import torch

import blt
from blt.bpe import encode_with_delimiters, token_spans, train_bpe
from blt.model.patching import (
    BpePatcher,
    BytePatcher,
    EntropyPatcher,
    SpacePatcher,
    StaticPatcher,
    calibrate_threshold,
    entropy_starts,
    lengths_to_starts,
    limit_patch_length,
    starts_to_lengths,
)
from tests.helpers import TEXT, random_entropy_model

T, F = True, False
H = torch.tensor([[9.0, 1.0, 3.0, 0.5, 2.0, 2.5, 0.1]])  # H[t]: uncertainty about byte t+1


def lengths(patcher, text, include_next=False):
    return patcher.patch_lengths(blt.encode(text), include_next=include_next)[0].tolist()


def test_static_and_byte():
    assert lengths(StaticPatcher(4), "abcdefghi") == [1, 4, 4, 1]
    assert lengths(StaticPatcher(4), "abcdefghi", include_next=True) == [1, 4, 4, 2]
    assert lengths(BytePatcher(), "abc") == [1, 1, 1, 1]


def test_space_rule():
    # a patch ends at a space-like byte that follows a non-space-like one; runs of spaces lead the next word
    assert lengths(SpacePatcher(), "ab cd  ef") == [1, 3, 3, 3]
    # the release counts UTF-8 lead bytes (>= 0xC0) as space-like: "aéb" is cut inside the é
    assert lengths(SpacePatcher(), "aéb") == [1, 2, 2]
    assert lengths(SpacePatcher(), "x\n\ny") == [1, 2, 2]


def test_entropy_global_threshold():
    assert entropy_starts(H, 1.5)[0].tolist() == [T, T, F, T, F, T, T, F]


def test_entropy_monotonic_rule():
    assert entropy_starts(H, 0.4, monotonicity=True)[0].tolist() == [T, T, T, T, F, T, T, F]


def test_entropy_combined_rule_as_released():
    assert entropy_starts(H, 1.5, threshold_add=0.4)[0].tolist() == [T, T, T, F, F, T, T, F]


def test_entropy_global_threshold_matches_transformers():
    modeling = pytest.importorskip("transformers.models.blt.modeling_blt")
    ent = torch.rand(1, 40, generator=torch.Generator().manual_seed(0)) * 4
    ours = starts_to_lengths(entropy_starts(ent, 2.0), 40)
    theirs = modeling.BltPatcher.patch_lengths_from_entropies(ent, 40, threshold=2.0)
    assert ours[0].tolist() == [n for n in theirs[0].tolist() if n > 0]


def release_split(lens, m):
    """The release's `split_large_numbers`, in plain Python."""
    out = []
    for n in lens:
        while n > m:
            out.append(m)
            n -= m
        out.append(n)
    return out


def test_max_patch_length_splits_like_the_release():
    for lens, m in (([1, 7], 3), ([1, 2, 9, 1, 4], 2), ([1, 5], 5)):
        starts = lengths_to_starts(torch.tensor([lens]), sum(lens))
        got = starts_to_lengths(limit_patch_length(starts, m), sum(lens))[0].tolist()
        assert got == release_split(lens, m)


def test_lengths_round_trip():
    lens = torch.tensor([[1, 3, 2, 4], [1, 9, 0, 0]])
    assert torch.equal(starts_to_lengths(lengths_to_starts(lens, 10), 10), lens)
    with_next = lengths_to_starts(torch.tensor([[1, 3, 6], [1, 9, 1]]), 10)
    assert with_next[:, -1].tolist() == [F, T]


def test_bpe_delimiters_and_patches():
    tok = train_bpe([TEXT * 4], 320)
    text = "it was the best of times"
    spans = token_spans(tok, text)
    assert spans[0][0] == 0 and spans[-1][1] == len(text) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    ids = torch.tensor(encode_with_delimiters(tok, text))
    assert int((ids == 3).sum()) == len(spans)
    patcher = BpePatcher(tok)
    assert torch.equal(patcher.encode(text), ids)
    got = patcher.patch_lengths(ids)[0].tolist()
    # BOS, then the first delimiter alone (position 1 always starts), then each token + the next delimiter
    token_lens = [b - a for a, b in spans]
    assert got == [1, 1] + [n + 1 for n in token_lens[:-1]] + [token_lens[-1]]
    assert blt.decode(ids) == text


def test_bpe_handles_any_bytes():
    tok = train_bpe([b"\x00\xff\xfe binary \x80"], 270)
    data = b"\xff\x00 binary \xc3"
    ids = encode_with_delimiters(tok, data)
    assert blt.tokenizer.ids_to_bytes(ids) == data


def test_calibrate_threshold_hits_the_target():
    em = random_entropy_model()
    texts = [TEXT * 2, TEXT[::-1] * 2]
    for target in (2.5, 4.0):
        theta = calibrate_threshold(em, texts, target)
        patcher = EntropyPatcher(em, theta)
        n_bytes = sum(len(blt.encode(t)) for t in texts)
        n_patches = sum(len(patcher.patch_lengths(blt.encode(t))[0]) for t in texts)
        assert abs(n_bytes / n_patches - target) / target < 0.05


def test_calibrate_rejects_bad_targets():
    with pytest.raises(blt.BltError, match=">= 1 byte"):
        calibrate_threshold(random_entropy_model(), [TEXT], 0.5)
