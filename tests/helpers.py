"""What several test modules share: small configs, a sharpened random entropy model, the patchers every
guarantee is checked under, transformers-built models for parity, and the hand-counted FLOP example."""

from pathlib import Path

import pytest
import torch
from transformers import BltConfig as HFBltConfig
from transformers import BltForCausalLM

import blt
from blt.bpe import train_bpe
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt.model import init_weights
from blt.model.patching import BpePatcher, BytePatcher, EntropyPatcher, SpacePatcher, StaticPatcher

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


SHARED_DATA = SHARED / "data"


TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity. Ça va? Grüße aus Köln! "
    "1234567890 -- éàü 漢字 テスト 🙂 done.\n"
)


def shared_path(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared corpora live in ../shared, next to the project)")
    return path


def tiny_entropy_config(**overrides) -> EntropyModelConfig:
    base = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=64, sliding_window=16, max_seqlen=512)
    base.update(overrides)
    return EntropyModelConfig(**base)


def tiny_config(**overrides) -> BLTConfig:
    base = dict(
        dim_local_encoder=32,
        n_layers_local_encoder=1,
        n_heads_local_encoder=4,
        dim_global=64,
        n_layers_global=2,
        n_heads_global=4,
        dim_local_decoder=32,
        n_layers_local_decoder=2,
        n_heads_local_decoder=4,
        ffn_dim_local_encoder=64,
        ffn_dim_global=128,
        ffn_dim_local_decoder=64,
        local_attention_window_len=16,
        cross_attn_k=2,
        cross_attn_nheads=4,
        encoder_hash_byte_group_size=[3, 4, 5],
        encoder_hash_byte_group_vocab=101,
        encoder_hash_byte_group_nb_functions=2,
        max_seqlen=512,
        max_encoder_seq_length=2048,
        patching=PatchingConfig(mode="static", patch_size=4),
    )
    base.update(overrides)
    return BLTConfig(**base)


def random_entropy_model(seed: int = 0, **overrides) -> blt.EntropyModel:
    torch.manual_seed(seed)
    model = blt.EntropyModel(tiny_entropy_config(**overrides))
    init_weights(model)
    # sharpen the random LM so entropies vary along a text (a flat LM gives ~ln 260 everywhere)
    with torch.no_grad():
        model.output.weight.mul_(12.0)
    return model.eval()


def median_threshold(entropy_model, ids: torch.Tensor) -> float:
    """A threshold near the median entropy of `ids`, halfway between two neighbouring entropies, so
    that no entropy sits within float noise of it (two implementations then decide alike)."""
    values = entropy_model.entropies(ids).flatten().sort().values
    middle = len(values) // 2
    upper = min(len(values), middle + 50)
    i = middle + int((values[middle + 1 : upper] - values[middle : upper - 1]).argmax())
    return float((values[i] + values[i + 1]) / 2)


def entropy_patcher(**kw):
    em = random_entropy_model()
    theta = median_threshold(em, blt.encode(TEXT)[None])
    if kw.get("monotonicity"):
        theta = 0.0531  # not a round number: a rise of exactly 0.05 would sit on it within float noise
    return EntropyPatcher(em, threshold=theta, **kw)


PATCHERS = {
    "byte": lambda: BytePatcher(),
    "static": lambda: StaticPatcher(4),
    "space": lambda: SpacePatcher(),
    "bpe": lambda: BpePatcher(train_bpe([TEXT * 3], 300)),
    "entropy-global": lambda: entropy_patcher(),
    "entropy-monotonic": lambda: entropy_patcher(monotonicity=True),
    "entropy-combined": lambda: entropy_patcher(threshold_add=0.0113),
    "entropy-max-length": lambda: entropy_patcher(max_patch_length=3),
    "space-max-length": lambda: SpacePatcher(max_patch_length=2),
}


def hf_config(
    enc_layers=1,
    enc_all=False,
    dec_layers=2,
    dec_all=True,
    k=2,
    d_local=32,
    d_global=64,
    n_hash=1,
    window=16,
    patcher_window=16,
    threshold=3.0,
):
    local = dict(
        hidden_size=d_local, num_attention_heads=4, intermediate_size=64, cross_attn_k=k, hidden_size_global=d_global
    )
    return HFBltConfig(
        vocab_size=260,
        max_position_embeddings=512,
        patch_in_forward=True,
        patching_threshold=threshold,
        cross_attn_k=k,
        encoder_hash_byte_group_size=[3, 4, 5],
        encoder_hash_byte_group_vocab=97,
        encoder_hash_byte_group_nb_functions=n_hash,
        local_attention_window_len=window,
        patcher_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            sliding_window=patcher_window,
        ),
        encoder_config=dict(local, num_hidden_layers=enc_layers, cross_attn_all_layers=enc_all),
        decoder_config=dict(local, num_hidden_layers=dec_layers, cross_attn_all_layers=dec_all),
        global_config=dict(hidden_size=d_global, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    )


def build_pair(tmp_path, seed=0, **cfg):
    torch.manual_seed(seed)
    hf = BltForCausalLM(hf_config(**cfg)).eval()
    with torch.no_grad():  # sharpen the random entropy model so that patch sizes vary
        hf.model.patcher.lm_head.weight.mul_(12.0)
    hf.save_pretrained(tmp_path / "hf")
    ours = blt.load_pretrained(tmp_path / "hf")
    return hf, ours


def set_threshold(hf, ours, ids):
    theta = median_threshold(ours.patcher.entropy_model, ids)
    hf.config.patching_threshold = theta
    ours.patcher.threshold = theta
    return theta


def hand_config(**overrides) -> BLTConfig:
    """d=8 (2 heads of 4) everywhere local, d_global=16 = k*d (no in_proj), one layer per stack, W=4."""
    base = dict(
        dim_local_encoder=8,
        n_layers_local_encoder=1,
        n_heads_local_encoder=2,
        ffn_dim_local_encoder=16,
        dim_global=16,
        n_layers_global=1,
        n_heads_global=2,
        ffn_dim_global=32,
        dim_local_decoder=8,
        n_layers_local_decoder=1,
        n_heads_local_decoder=2,
        ffn_dim_local_decoder=16,
        local_attention_window_len=4,
        cross_attn_k=2,
        cross_attn_nheads=2,
    )
    base.update(overrides)
    return BLTConfig(**base)


HAND_ENTROPY = EntropyModelConfig(dim=8, n_layers=1, n_heads=2, ffn_dim=16, sliding_window=4)


# seq_bytes=8, mean_patch_bytes=2 -> P=4 patches. Per byte:
HAND = {
    # the same one-block, d=8 byte LM as the local encoder (1384) + head 2*8*260 = 4160
    "entropy_model": 5544,
    # q,k,v,o: 4 * 2*8*8 = 512; keys: mean(1,2,3,4,4,4,4,4) = 26/8 = 3.25, QK+AV: 2 * 2*8*3.25 = 104;
    # SwiGLU: 3 * 2*8*16 = 768  -> 512 + 104 + 768
    "local_encoder": 1384,
    # per patch: pooling proj 2*8*16 = 256, q and o for k=2 queries 2 * 2*2*8*8 = 512, attention of 2
    # queries over the patch's 2 bytes 2 * 2*2*8*2 = 128 -> 896 per patch = 448 per byte;
    # per byte: k and v 2 * 2*8*8 = 256  -> 448 + 256
    "encoder_cross_attention": 704,
    # per patch: q,k,v,o 4 * 2*16*16 = 2048; keys over 4 patches mean(1,2,3,4) = 2.5, 2 * 2*16*2.5 = 160;
    # SwiGLU 3 * 2*16*32 = 3072 -> 5280 per patch / 2 bytes
    "global_transformer": 2640,
    # per patch: patch proj 2*16*16 = 512, k and v for its 2 keys 2 * 2*2*8*8 = 512 -> 1024 / 2 = 512;
    # per byte: q and o 2 * 2*8*8 = 256, attention over k=2 keys 2 * 2*8*2 = 64  -> 512 + 256 + 64
    "decoder_cross_attention": 832,
    "local_decoder": 1384,
    "head": 4160,  # 2*8*260
}


SHORT, LONG = "It was", TEXT[:90]  # shorter and longer than the 16-byte local window


def generation_model(name, seed=0, **cfg):
    """A tiny BLT with patcher `name` (of PATCHERS) whose greedy choices are clear-cut."""
    patcher = PATCHERS[name]()
    torch.manual_seed(seed)
    cfg = {"max_seqlen": 2048, **cfg}
    model = blt.BLT(
        tiny_config(patching=PatchingConfig(mode=patcher.mode, patch_size=4), **cfg), patcher=patcher
    ).eval()
    with torch.no_grad():  # a peaked next-byte distribution: greedy choices are clear-cut, texts vary
        model.local_decoder.output.weight.mul_(4.0)
    return model
