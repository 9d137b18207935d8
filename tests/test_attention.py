"""The three restricted attentions equal a dense masked `scaled_dot_product_attention`."""

import torch
import torch.nn.functional as F

from blt.model.masks import LocalMask, decoder_cross_mask, document_ids, encoder_cross_mask
from blt.model.transformer import gather_attention, segment_attention, windowed_attention

g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g)


def test_windowed_attention_equals_the_dense_mask():
    ids = torch.randint(4, 260, (2, 45), generator=g)
    ids[0, 10] = ids[1, 30] = 2  # documents end here
    for docs in (None, document_ids(ids)):
        mask = LocalMask(45, 8, docs)
        assert mask.banded
        q, k, v = rand(2, 3, 45, 4), rand(2, 3, 45, 4), rand(2, 3, 45, 4)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device))
        assert (windowed_attention(q, k, v, mask) - dense).abs().max() < 1e-5


def test_gather_attention_equals_the_decoder_mask():
    b, t, p, k, h, hd = 2, 11, 4, 3, 2, 4
    index = torch.randint(0, p, (b, t), generator=g)
    q, keys, values = rand(b, t, h, hd), rand(b, p, k, h, hd), rand(b, p, k, h, hd)
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.flatten(1, 2).transpose(1, 2),
        values.flatten(1, 2).transpose(1, 2),
        attn_mask=decoder_cross_mask(index, p, k),
    ).transpose(1, 2)
    assert (gather_attention(q, keys, values, index) - dense).abs().max() < 1e-5


def test_segment_attention_equals_the_encoder_mask_and_empty_patches_get_zeros():
    b, t, p, k, h, hd = 2, 12, 6, 2, 2, 4
    index = torch.tensor(
        [[0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4], [0, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4]]
    )  # patch 5 is empty
    q, keys, values = rand(b, p, k, h, hd), rand(b, t, h, hd), rand(b, t, h, hd)
    mask = encoder_cross_mask(index, p, k)
    dense = (
        F.scaled_dot_product_attention(
            q.flatten(1, 2).transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask | ~mask.any(-1, keepdim=True),
        )
        .transpose(1, 2)
        .unflatten(1, (p, k))
    )
    got = segment_attention(q, keys, values, index)
    assert (got[:, :5] - dense[:, :5]).abs().max() < 1e-5
    assert torch.equal(got[:, 5], torch.zeros_like(got[:, 5]))
