"""Parity with transformers==5.23.0 `BltForCausalLM`: random weights built in transformers, saved with
its `save_pretrained`, read by our `load_pretrained`.

Where transformers departs from the release we follow the release; each departure has its own test
below showing the difference and what the release semantics give.
"""

import pytest
import torch
from transformers.models.blt import modeling_blt

import blt
from tests.helpers import TEXT, build_pair, hf_config, set_threshold

TOL = 1e-4


def batch_of_three(length):
    data = (TEXT * 8).encode()
    rows = [blt.encode(data[i * 37 : i * 37 + length - 1]) for i in range(3)]
    return torch.stack(rows)


def hf_starts(hf, ids, theta):
    """transformers' patch starts over the T bytes, from its patch lengths."""
    _, lengths, _ = hf.model.patcher(ids, patch_size=hf.config.patch_size, threshold=theta)
    starts = torch.zeros(ids.shape, dtype=torch.bool)
    for row, ls in enumerate(lengths.tolist()):
        pos = 0
        for n in ls:
            if n > 0 and pos < ids.shape[1]:
                starts[row, pos] = True
            pos += max(n, 0)
    return starts


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits


def check_parity(hf, ours, ids):
    """Same patch starts over the bytes, same logits at every position. Both sides also decide from
    the last entropy whether the byte after the text opens a patch (the release's include-next-token):
    the last position reads the patch that byte would close."""
    theta = set_threshold(hf, ours, ids)
    starts = ours.patcher(ids)
    assert torch.equal(starts[:, : ids.shape[1]], hf_starts(hf, ids, theta)), "entropy patch starts differ"
    assert (ours(ids) - hf_logits(hf, ids)).abs().max() < TOL
    return starts


CONFIGS = {
    "1-enc-layer": dict(enc_layers=1),
    "2-enc-layers": dict(enc_layers=2, n_hash=2),
    "dec-cross-first-layer-only": dict(dec_all=False, dec_layers=3),
    "global-projection": dict(d_global=48),
    "k4-projection": dict(k=4, d_global=48),
    "long-window": dict(window=512, patcher_window=512),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [40, 300])
def test_logits_and_patches_match(tmp_path, name, length):
    hf, ours = build_pair(tmp_path, **CONFIGS[name])
    ids = batch_of_three(length)
    starts = check_parity(hf, ours, ids)
    n_patches = starts[:, :length].sum(1)
    assert (n_patches > 2).all() and (n_patches < length).all(), (
        "the patches should be neither trivial nor all single bytes"
    )


def test_parity_when_the_next_byte_opens_a_patch(tmp_path):
    """A prefix whose next byte opens a patch: the last position must read the patch it closes."""
    hf, ours = build_pair(tmp_path, seed=3)
    full = batch_of_three(120)[:1]
    set_threshold(hf, ours, full)
    starts = ours.patcher(full)[0]
    t = int(starts[20:].nonzero()[0]) + 20  # the first position >= 20 that opens a patch
    prefix = full[:, :t]
    hf.config.patching_threshold = ours.patcher.threshold
    assert bool(ours.patcher(prefix)[0, -1])
    assert (ours(prefix) - hf_logits(hf, prefix)).abs().max() < TOL
    # and the logits of the prefix are those of the full text at the same positions (causality)
    assert (ours(prefix) - ours(full)[:, :t]).abs().max() < TOL


def release_encoder_forward(
    self,
    input_ids=None,
    inputs_embeds=None,
    patch_embeds=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    encoder_attention_mask=None,
    num_patches=None,
    patch_ids=None,
    **kwargs,
):
    """transformers' local encoder with the release's semantics: the cross-attention queries are
    max-pooled once, at the first cross-attention layer, then refined layer after layer."""
    hidden = inputs_embeds
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    rope = self.rotary_emb(hidden, position_ids)
    queries = None
    for idx, layer in enumerate(self.layers):
        hidden = layer(hidden, position_embeddings=rope, attention_mask=attention_mask)
        if idx == len(self.layers) - 1 or self.config.cross_attn_all_layers:
            if queries is None:
                queries = self.patch_embedding_projection(self.patch_reduce(hidden, num_patches, patch_ids))
                queries = queries.reshape(hidden.shape[0], -1, self.config.hidden_size)
            out, _ = self.cross_attn_layers[idx if self.config.cross_attn_all_layers else 0](
                hidden_states=queries, cross_attention_states=hidden, attention_mask=encoder_attention_mask
            )
            queries = queries + out
    return hidden, queries


def test_encoder_cross_attention_on_all_layers_follows_the_release(tmp_path, monkeypatch):
    """transformers re-pools the byte states at every encoder cross-attention layer, throwing away the
    previous layer's cross-attention; the release pools once and refines. We follow the release."""
    hf, ours = build_pair(tmp_path, enc_layers=2, enc_all=True)
    ids = batch_of_three(64)
    set_threshold(hf, ours, ids)
    a = ours(ids)
    plain = hf_logits(hf, ids)
    assert (a[:, :-1] - plain[:, :-1]).abs().max() > 1e-3
    monkeypatch.setattr(modeling_blt.BltLocalEncoder, "forward", release_encoder_forward)
    check_parity(hf, ours, ids)


def test_documents_are_masked_as_in_the_release(tmp_path):
    """transformers attends across EOS in packed sequences; the release (and we) do not, in the entropy
    model and in the local models. Without an EOS inside, nothing differs (the tests above)."""
    hf, ours = build_pair(tmp_path, window=512, patcher_window=512)
    first, second = blt.encode(TEXT[:50], eos=True), blt.encode(TEXT[50:110])
    packed = torch.cat([first, second])[None]
    # entropy model: the second document sees nothing of the first
    alone = ours.patcher.entropies(second[None])[0]
    inside = ours.patcher.entropies(packed)[0, len(first) :]
    assert (alone - inside).abs().max() < 1e-4
    with torch.no_grad():
        hf_inside = modeling_blt.BltPatcher.forward(hf.model.patcher, packed)[0][0, len(first) :]
    assert (alone - hf_inside).abs().max() > 1e-3
    # the full model: same patches given to both, the logits after the EOS differ
    lengths = ours.patcher.patch_lengths(packed)
    a = ours(packed, patch_lengths=lengths)
    with torch.no_grad():
        b = hf(packed, patch_lengths=lengths, use_cache=False).logits
    n = len(first)
    assert (a[:, :n] - b[:, :n]).abs().max() < TOL
    assert (a[:, n + 1 :] - b[:, n + 1 :]).abs().max() > 1e-3
    ours.config.local_document_mask = False
    ours.patcher.entropy_model.config.document_mask = False
    assert (ours(packed, patch_lengths=lengths)[:, :-1] - b[:, :-1]).abs().max() < TOL


def test_cross_attention_heads_follow_the_release():
    """The release gives cross-attention its own head count (`cross_attn_nheads`); transformers uses
    the local model's. Same weights, different heads, different logits; converting such a model to
    transformers' layout is refused with a message rather than silently changing it."""
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    ours = blt.BLT(tiny_config(cross_attn_nheads=2))
    hf_semantics = blt.BLT(tiny_config(cross_attn_nheads=None))
    hf_semantics.load_state_dict(ours.state_dict())
    ids = blt.encode(TEXT[:60])[None]
    assert (ours(ids) - hf_semantics(ids)).abs().max() > 1e-4
    from blt.weights.hf import save_hf

    with pytest.raises(blt.BltError, match="cross_attn_nheads=2"):
        save_hf(ours, "/tmp/never-written")


def test_inconsistent_k_in_transformers_config_is_named(tmp_path):
    """transformers keeps cross_attn_k in three places; a config where they disagree (its k != 2
    failure) is refused with a message naming the fields."""
    cfg = hf_config(k=4, d_global=48)
    cfg.encoder_config.cross_attn_k = 2
    from blt.weights.hf import config_from_hf

    with pytest.raises(blt.BltError, match="encoder_config.cross_attn_k=2"):
        config_from_hf(cfg.to_dict())


def test_local_window_shorter_than_text_is_used(tmp_path):
    """With a 16-byte window and 300 bytes, the window matters: a 512 window gives other logits."""
    hf, ours = build_pair(tmp_path)
    ids = batch_of_three(300)
    set_threshold(hf, ours, ids)
    a = ours(ids)
    ours.config.local_attention_window_len = 512
    assert (ours(ids)[:, 40:] - a[:, 40:]).abs().max() > 1e-3
