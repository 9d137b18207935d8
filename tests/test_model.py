"""The model's guarantees: causality under every patcher, batch independence, the 7B-style k=4
projection, and clear errors for bad input."""

import pytest
import torch

import blt
from blt.config import PatchingConfig
from blt.model.patching import SpacePatcher, StaticPatcher
from tests.helpers import PATCHERS, TEXT, entropy_patcher, random_entropy_model, tiny_config


def make_model(patcher, seed=0, **cfg):
    torch.manual_seed(seed)
    return blt.BLT(tiny_config(patching=PatchingConfig(mode=patcher.mode, patch_size=4), **cfg), patcher=patcher).eval()


@pytest.mark.parametrize("name", list(PATCHERS))
def test_causality(name):
    """Changing bytes after position t never changes logits at positions <= t (nor patches there)."""
    patcher = PATCHERS[name]()
    model = make_model(patcher)
    ids = patcher.encode(TEXT)[None]
    base = model(ids)
    starts = model.patch_starts(ids)
    assert 2 < int(starts.sum()) < ids.shape[1] or name == "byte", "patches should be non-trivial"
    gen = torch.Generator().manual_seed(1)
    for t in (5, 40, ids.shape[1] // 2, ids.shape[1] - 3):
        changed = ids.clone()
        changed[0, t + 1 :] = torch.randint(4, 260, (ids.shape[1] - t - 1,), generator=gen)
        changed[0, t + 1 :: 3] = 3 if name == "bpe" else changed[0, t + 1 :: 3]  # new delimiters too
        out = model(changed)
        assert (out[0, : t + 1] - base[0, : t + 1]).abs().max() < 1e-5, f"position <= {t} saw the future"
        assert torch.equal(model.patch_starts(changed)[0, : t + 2], starts[0, : t + 2])
        assert (out[0, t + 1 :] - base[0, t + 1 :]).abs().max() > 1e-4  # the change is visible after t


@pytest.mark.parametrize("name", ["entropy-global", "space", "static"])
def test_batch_rows_are_independent(name):
    """Each row of a (right-padded) batch gets the patches and logits it gets alone."""
    patcher = PATCHERS[name]()
    model = make_model(patcher)
    texts = [TEXT[:37], TEXT[50:200], TEXT[10:90]]
    ids, lengths = blt.encode_batch(texts)
    logits = model(ids)
    starts = model.patch_starts(ids)
    for i, text in enumerate(texts):
        alone = blt.encode(text)[None]
        n = int(lengths[i])
        assert torch.equal(starts[i, : n + 1], model.patch_starts(alone)[0])
        assert (logits[i, :n] - model(alone)[0]).abs().max() < 1e-5


def test_entropy_of_a_row_ignores_the_other_rows():
    """The release flattens a batch before running its entropy model, so rows see each other's bytes;
    here a row's entropies are those it has alone."""
    em = random_entropy_model()
    a, b = blt.encode(TEXT[:64]), blt.encode(TEXT[64:128])
    batch = em.entropies(torch.stack([a, b]))
    assert (batch[1] - em.entropies(b[None])[0]).abs().max() < 1e-5
    flattened = em.entropies(torch.cat([a, b])[None])[0, len(a) :]  # what row b gets when rows are concatenated
    assert (flattened - em.entropies(b[None])[0]).abs().max() > 1e-3


def test_k4_with_projection_forward_backward_and_causal():
    """The 7B shape: k=4 pooled vectors per patch, k*d_enc != d_global, so the global input is projected."""
    model = make_model(StaticPatcher(4), cross_attn_k=4, dim_global=48, ffn_dim_global=96)
    assert model.global_transformer.in_proj is not None
    assert model.global_transformer.in_proj.weight.shape == (48, 4 * 32)
    ids = blt.encode(TEXT)[None]
    model.train()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("patcher.")}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["global_transformer.in_proj.weight"].abs().sum() > 0
    assert grads["local_encoder.cross_attn.0.attn.wq.weight"].abs().sum() > 0
    model.eval()
    base = model(ids)
    changed = ids.clone()
    changed[0, 100:] = 4 + ord("z")
    assert (model(changed)[0, :100] - base[0, :100]).abs().max() < 1e-5


def test_decoder_never_reads_the_patch_of_its_target():
    """Byte t predicts byte t+1 and must read only patches that end at or before t."""
    model = make_model(StaticPatcher(4))
    ids = blt.encode(TEXT[:40])[None]
    starts = model.patch_starts(ids)
    patch_of = starts.long().cumsum(1) - 1
    dec = patch_of[0, 1:] - 1
    ends = {int(p): int((patch_of[0, :-1] == p).nonzero().max()) for p in dec.unique()}
    for t, p in enumerate(dec.tolist()):
        assert ends[p] <= t


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), "empty sequence"),
        (torch.tensor([[1, 5, 300]]), "found 300 at row 0, position 2"),
        (torch.tensor([[1, -1]]), "found -1"),
        (torch.tensor([[1.0, 5.0]]), "integer tensor"),
        (torch.tensor([1, 5, 6]), "ids\\[None\\]"),
        ([[1, 5, 6]], "torch.Tensor"),
    ],
)
def test_bad_ids_are_named(ids, message):
    model = make_model(StaticPatcher(4))
    with pytest.raises(blt.BltError, match=message):
        model(ids)


@pytest.mark.parametrize(
    "lengths, message",
    [
        (torch.tensor([[1, 4, 4]]), "sums to 9; expected 10"),
        (torch.tensor([[2, 4, 4]]), "BOS\\) alone"),
        (torch.tensor([[1, 0, 9]]), "padded with zeros on the right"),
        (torch.tensor([[1, -3, 12]]), "negative"),
        (torch.tensor([[1.0, 9.0]]), "integer tensor"),
    ],
)
def test_bad_patch_lengths_are_named(lengths, message):
    model = make_model(StaticPatcher(4))
    with pytest.raises(blt.BltError, match=message):
        model(torch.arange(4, 14)[None], patch_lengths=lengths)


def test_explicit_patch_lengths_match_the_patcher():
    patcher = SpacePatcher()
    model = make_model(patcher)
    ids = blt.encode(TEXT[:80])[None]
    for include_next in (False, True):
        lengths = patcher.patch_lengths(ids, include_next=include_next)
        out = model(ids, patch_lengths=lengths)
        if include_next:
            assert torch.equal(out, model(ids))
        else:  # without the next-byte decision the last position reads the patch it is in
            assert torch.equal(out[:, :-1], model(ids)[:, :-1])


def test_entropy_model_required_when_patching_by_entropy():
    model = blt.BLT(tiny_config(patching=PatchingConfig(mode="entropy")))
    with pytest.raises(blt.BltError, match="no entropy model attached"):
        model(blt.encode("abc")[None])
    assert model(blt.encode("abc")[None], patch_lengths=torch.tensor([[1, 3]])).shape == (1, 4, 260)


def test_one_block_and_one_attention_serve_all_stacks():
    from blt.model.transformer import Attention, TransformerBlock

    model = blt.BLT(tiny_config(), patcher=entropy_patcher())
    owners = {n.split(".")[0] for n, m in model.named_modules() if isinstance(m, TransformerBlock)}
    owners |= {"entropy" for m in model.entropy_model.modules() if isinstance(m, TransformerBlock)}
    assert owners == {"local_encoder", "global_transformer", "local_decoder", "entropy"}
    modules = [*model.modules(), *model.entropy_model.modules()]
    attn_types = {type(m) for m in modules if "Attention" in type(m).__name__ and not hasattr(m, "attn")}
    assert attn_types == {Attention}
