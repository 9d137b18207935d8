import torch

from blt.model.masks import (
    decoder_cross_mask,
    document_ids,
    encoder_cross_mask,
    self_attention_mask,
    sequence_self_mask,
)

T, F = True, False


def test_causal():
    m = self_attention_mask(torch.arange(3))[0, 0]
    assert m.tolist() == [[T, F, F], [T, T, F], [T, T, T]]


def test_sliding_window_includes_self():
    m = self_attention_mask(torch.arange(4), window=2)[0, 0]
    assert m.tolist() == [[T, F, F, F], [T, T, F, F], [F, T, T, F], [F, F, T, T]]


def test_documents_end_with_their_eos():
    ids = torch.tensor([[1, 10, 2, 1, 11, 2, 1]])
    assert document_ids(ids).tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    m = self_attention_mask(torch.arange(7), q_doc=document_ids(ids))[0, 0]
    assert m[3].tolist() == [F, F, F, T, F, F, F]
    assert m[2].tolist() == [T, T, T, F, F, F, F]


def test_cached_step_mask_uses_absolute_positions():
    # one query at position 5 against keys at positions 2..5 with a window of 3
    m = self_attention_mask(torch.tensor([5]), torch.arange(2, 6), window=3)[0, 0]
    assert m.tolist() == [[F, T, T, T]]


def test_sequence_self_mask_fast_path():
    ids = torch.tensor([[1, 10, 11, 12]])
    assert sequence_self_mask(ids, window=8, document_mask=True) is None  # plain causal suffices
    assert (
        sequence_self_mask(torch.tensor([[1, 10, 11, 2]]), window=8, document_mask=True) is None
    )  # final EOS splits nothing
    assert sequence_self_mask(ids, window=2, document_mask=True) is not None
    assert sequence_self_mask(torch.tensor([[1, 2, 1, 12]]), window=None, document_mask=True) is not None


def test_patch_cross_masks():
    byte_patch = torch.tensor([[0, 1, 1, 2]])
    enc = encoder_cross_mask(byte_patch, 3, k=2)[0, 0]
    assert enc.tolist() == [[T, F, F, F], [T, F, F, F], [F, T, T, F], [F, T, T, F], [F, F, F, T], [F, F, F, T]]
    dec = decoder_cross_mask(torch.tensor([[0, 0, 1]]), 2, k=2)[0, 0]
    assert dec.tolist() == [[T, T, F, F], [T, T, F, F], [F, F, T, T]]
