import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import blt
from blt.config import BLTConfig, EntropyModelConfig
from blt.flops import (
    COMPONENTS,
    component_flops,
    dense_transformer_flops,
    entropy_model_flops,
    executed_forward_flops,
    flops_per_byte,
    format_table,
    self_attention_keys,
)
from blt.model.masks import sequence_self_mask
from blt.tokenizer import EOS_ID
from tests.helpers import HAND, HAND_ENTROPY, hand_config, random_entropy_model, tiny_config, tiny_entropy_config


def test_component_flops_by_hand():
    got = component_flops(hand_config(), seq_bytes=8, mean_patch_bytes=2, entropy_config=HAND_ENTROPY)
    assert list(got) == list(COMPONENTS)
    for name in COMPONENTS:
        assert got[name] == pytest.approx(HAND[name], rel=1e-9), name


def test_gqa_and_in_proj_by_hand():
    c = hand_config(n_kv_heads=1, dim_global=32, ffn_dim_global=64)
    got = component_flops(c, seq_bytes=8, mean_patch_bytes=2)
    assert got["entropy_model"] == 0
    # one kv head of 4: k and v cost 2 * 2*8*4 = 128 instead of 256
    assert got["local_encoder"] == pytest.approx(1384 - 128, rel=1e-9)
    assert got["local_decoder"] == pytest.approx(1384 - 128, rel=1e-9)
    # per patch: in_proj 2*16*32 = 1024; q,k,v,o 4 * 2*32*32 = 8192; attention 2 * 2*32*2.5 = 320;
    # SwiGLU 3 * 2*32*64 = 12288 -> 21824 per patch / 2 bytes
    assert got["global_transformer"] == pytest.approx(10912, rel=1e-9)
    # the decoder's patch projection reads d_global=32: 2*32*16 = 1024 per patch, 256 more per byte
    assert got["decoder_cross_attention"] == pytest.approx(832 + 256, rel=1e-9)


def test_cross_attention_on_all_layers_counts_each_layer():
    one = component_flops(
        hand_config(n_layers_local_encoder=2, n_layers_local_decoder=2, cross_attn_all_layers_decoder=False), 8, 2
    )
    every = component_flops(
        hand_config(n_layers_local_encoder=2, n_layers_local_decoder=2, cross_attn_all_layers_encoder=True), 8, 2
    )
    # the pooling projection runs once (128 per byte); each further encoder layer adds 704 - 128 = 576
    assert one["encoder_cross_attention"] == pytest.approx(704, rel=1e-9)
    assert every["encoder_cross_attention"] == pytest.approx(704 + 576, rel=1e-9)
    # the decoder's patch projection runs once (256 per byte); each further layer adds 832 - 256 = 576
    assert one["decoder_cross_attention"] == pytest.approx(832, rel=1e-9)
    assert every["decoder_cross_attention"] == pytest.approx(832 + 576, rel=1e-9)


def test_self_attention_keys():
    assert self_attention_keys(8, 4) == 26 / 8  # 1+2+3+4+4+4+4+4
    assert self_attention_keys(8, None) == 4.5  # (L+1)/2
    assert self_attention_keys(8, 100) == 4.5  # a window longer than the sequence cuts nothing
    assert self_attention_keys(8, 1) == 1
    assert self_attention_keys(8, 4, attention="executed") == 8
    with pytest.raises(blt.BltError, match="attention must be one of"):
        self_attention_keys(8, 4, attention="flash")


def test_flops_per_byte_training_is_three_forwards_but_entropy_model_is_frozen():
    report = flops_per_byte(hand_config(), 8, 2, HAND_ENTROPY)
    assert report["components"]["entropy_model"] == {"inference": pytest.approx(5544), "training": pytest.approx(5544)}
    assert report["components"]["global_transformer"] == {
        "inference": pytest.approx(2640),
        "training": pytest.approx(3 * 2640),
    }
    # 5544 + 1384 + 704 + 2640 + 832 + 1384 + 4160
    assert report["inference_total"] == pytest.approx(16648, rel=1e-9)
    # 5544 + 3 * (16648 - 5544)
    assert report["training_total"] == pytest.approx(38856, rel=1e-9)


def test_format_table():
    table = format_table(flops_per_byte(hand_config(), 8, 2, HAND_ENTROPY))
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if not line.startswith(("-", "component"))}
    assert list(rows) == [*COMPONENTS, "total"]
    assert rows["entropy_model"] == ["5.54e+03", "5.54e+03"]
    assert rows["global_transformer"] == ["2.64e+03", "7.92e+03"]
    assert rows["total"] == ["1.66e+04", "3.89e+04"]


def test_longer_patches_cut_global_flops_per_byte_proportionally():
    c, T = BLTConfig(), 8192
    d, layers = c.dim_global, c.n_layers_global

    def per_patch_without_attention(m):
        # FLOPs per patch, less the attention term, whose context (P+1)/2 shrinks with P = T/m
        attention = layers * 2 * 2 * d * self_attention_keys(T / m)
        return component_flops(c, T, m)["global_transformer"] * m - attention

    base = per_patch_without_attention(4.5)
    for m in (2.0, 6.0, 8.0):
        assert per_patch_without_attention(m) == pytest.approx(base, rel=1e-12)
    # so per byte: 8-byte patches cost a bit under 4.5/8 of 4.5-byte ones (the attention shrinks too)
    ratio = component_flops(c, T, 8.0)["global_transformer"] / component_flops(c, T, 4.5)["global_transformer"]
    assert 0.9 * 4.5 / 8 < ratio < 4.5 / 8
    # and the local models do not depend on the patch size
    assert component_flops(c, T, 8.0)["local_decoder"] == component_flops(c, T, 4.5)["local_decoder"]


def test_entropy_model_is_a_dense_transformer():
    c = EntropyModelConfig()
    # a byte LM baseline with full causal attention over 8192 bytes
    baseline = dense_transformer_flops(
        c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, 8192, None
    )
    # per layer: 4 * 2*768*768 + 3 * 2*768*2048 (SwiGLU width 2048) + 2 * 2*768 * 8193/2; head 2*768*260
    expected = 14 * (4_718_592 + 9_437_184 + 768 * 2 * 8193) + 399_360
    assert baseline == pytest.approx(expected, rel=1e-12)
    # the 512-byte window: (512*513/2 + (8192-512)*512) / 8192 keys per query
    keys = (512 * 513 / 2 + 7680 * 512) / 8192
    assert entropy_model_flops(c, 8192) == pytest.approx(
        14 * (4_718_592 + 9_437_184 + 4 * 768 * keys) + 399_360, rel=1e-12
    )


# ---- against what torch counts ----------------------------------------------------------------------
#
# On CPU, scaled_dot_product_attention runs the fused `_scaled_dot_product_flash_attention_for_cpu`,
# which FlopCounterMode has no formula for: it would count the attention as zero FLOPs. The math backend
# runs the same attention as plain bmm's, which it counts, dense (every query against every key, masked
# or is_causal alike) -- which is also how it counts the fused GPU kernels.


def counted(fn, *args) -> FlopCounterMode:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter


def module_flops(counter: FlopCounterMode, name: str) -> int:
    return sum(counter.get_flop_counts()[name].values())


def byte_ids(length: int, eos_at: int | None = None) -> torch.Tensor:
    torch.manual_seed(length)
    ids = torch.randint(4, 260, (1, length))
    ids[0, 0] = blt.BOS_ID
    if eos_at is not None:
        ids[0, eos_at] = EOS_ID
    return ids


# (length, EOS position): within the window of 16 and one document -> is_causal fast path;
# an EOS inside -> document mask; longer than the window -> window mask; longer than two windows ->
# banded blocks (with and without a document boundary)
PATHS = [(12, None, "is_causal"), (12, 6, "mask"), (24, None, "mask"), (45, None, "banded"), (45, 20, "banded")]


@pytest.mark.parametrize("length,eos_at,path", PATHS)
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # GQA, an in_proj (k*d = 64 != 48), encoder cross-attention on both layers, decoder's on the first only
        dict(
            n_kv_heads=2,
            dim_global=48,
            n_layers_local_encoder=2,
            cross_attn_all_layers_encoder=True,
            cross_attn_all_layers_decoder=False,
        ),
    ],
)
def test_executed_flops_match_flop_counter_blt(overrides, length, eos_at, path):
    config = tiny_config(**overrides)
    ids = byte_ids(length, eos_at)
    mask = sequence_self_mask(ids, config.local_attention_window_len, config.local_document_mask)
    assert (mask is None) == (path == "is_causal")
    torch.manual_seed(0)
    model = blt.BLT(config, patcher=blt.StaticPatcher(4)).eval()
    num_patches = int(model.patcher(ids).sum())  # the model's P: starts over T+1 positions
    counter = counted(model, ids)
    want = executed_forward_flops(config, length, num_patches)
    assert want["entropy_model"] == 0
    assert counter.get_total_flops() == sum(want.values())
    assert module_flops(counter, "BLT.local_encoder") == want["local_encoder"] + want["encoder_cross_attention"]
    assert module_flops(counter, "BLT.global_transformer") == want["global_transformer"]
    assert (
        module_flops(counter, "BLT.local_decoder")
        == want["decoder_cross_attention"] + want["local_decoder"] + want["head"]
    )
    assert module_flops(counter, "BLT.local_decoder.output") == want["head"]


@pytest.mark.parametrize("length,eos_at,path", PATHS)
def test_executed_flops_match_flop_counter_entropy_model(length, eos_at, path):
    config = tiny_entropy_config()
    ids = byte_ids(length, eos_at)
    assert (sequence_self_mask(ids, config.sliding_window, config.document_mask) is None) == (path == "is_causal")
    model = random_entropy_model()
    counter = counted(model, ids)
    assert counter.get_total_flops() == length * entropy_model_flops(config, length, attention="executed")


def test_executed_flops_include_the_entropy_model_when_it_patches():
    config = tiny_config()
    entropy_model = random_entropy_model()
    ids = byte_ids(24)
    # halfway between two neighbouring entropies, so that no entropy sits within rounding of it
    values = entropy_model.entropies(ids).flatten().sort().values
    threshold = float(values[11] + values[12]) / 2
    model = blt.BLT(config, patcher=blt.EntropyPatcher(entropy_model, threshold)).eval()
    with sdpa_kernel(SDPBackend.MATH):  # the kernel `counted` runs: the fused one rounds differently
        num_patches = int(model.patcher(ids).sum())
    assert 2 < num_patches < 25  # neither one patch nor one per byte
    counter = counted(model, ids)
    want = executed_forward_flops(config, 24, num_patches, entropy_config=entropy_model.config)
    assert (
        module_flops(counter, "EntropyModel")
        == want["entropy_model"]
        == 24 * entropy_model_flops(entropy_model.config, 24, "executed")
    )
    assert counter.get_total_flops() == sum(want.values())


def test_useful_flops_against_executed():
    config, length = tiny_config(), 24
    ids = byte_ids(length)
    num_patches = int(blt.StaticPatcher(4)(ids).sum())
    useful = component_flops(config, length, length / num_patches, tiny_entropy_config())
    executed = executed_forward_flops(config, length, num_patches, tiny_entropy_config())
    for name in ("entropy_model", "local_encoder", "global_transformer", "local_decoder"):
        assert useful[name] * length < executed[name], name  # the kernels score keys the masks drop
    # a byte reads exactly its patch's k keys, and the head attends to nothing: nothing is wasted
    assert useful["decoder_cross_attention"] * length == pytest.approx(executed["decoder_cross_attention"], rel=1e-12)
    assert useful["head"] * length == pytest.approx(executed["head"], rel=1e-12)
    # the encoder scores each byte against its own patch's queries only; its weighted sum of values
    # (QK^T's twin) is a scatter-add, counted as useful work but not as an executed matmul
    d, k = config.dim_local_encoder, config.cross_attn_k
    assert useful["encoder_cross_attention"] * length - executed["encoder_cross_attention"] == pytest.approx(
        2 * length * k * d, rel=1e-12
    )
