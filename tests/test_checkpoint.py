"""Weights in and out: our format, transformers' format both ways, the release's two layouts, and
clear errors for broken directories."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import blt
from blt.config import BLTConfig, PatchingConfig
from tests.helpers import TEXT, median_threshold, random_entropy_model, tiny_config

IDS = blt.encode(TEXT[:120])[None]


def entropy_blt(seed=0, **cfg):
    em = random_entropy_model(seed)
    theta = median_threshold(em, IDS)
    torch.manual_seed(seed)
    config = tiny_config(patching=PatchingConfig(mode="entropy", threshold=theta), cross_attn_nheads=None, **cfg)
    return blt.BLT(config, patcher=blt.EntropyPatcher(em, theta)).eval()


def test_config_round_trips_through_json():
    c = tiny_config(cross_attn_k=4, patching=PatchingConfig(mode="entropy", threshold=1.2, monotonicity=True))
    assert BLTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(blt.BltError, match="unknown BLTConfig field"):
        BLTConfig.from_dict({**c.to_dict(), "dim_bogus": 1})


def test_ours_round_trip(tmp_path):
    model = entropy_blt()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "entropy_model", "model.safetensors"]
    assert not any(k.startswith("patcher") for k in load_file(tmp_path / "m" / "model.safetensors"))
    loaded = blt.load_pretrained(tmp_path / "m")
    assert torch.equal(loaded(IDS), model(IDS))
    assert loaded.patcher.threshold == model.patcher.threshold
    em = blt.load_pretrained(tmp_path / "m" / "entropy_model")
    assert isinstance(em, blt.EntropyModel)


def test_bpe_model_round_trip(tmp_path):
    from blt.bpe import train_bpe

    tok = train_bpe([TEXT], 300)
    torch.manual_seed(0)
    model = blt.BLT(tiny_config(patching=PatchingConfig(mode="bpe")), patcher=blt.BpePatcher(tok)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = blt.load_pretrained(tmp_path / "m")
    ids = loaded.encode("it was the age of wisdom")[None]
    assert torch.equal(ids, model.encode("it was the age of wisdom")[None])
    assert torch.equal(loaded(ids), model(ids))


def test_ours_to_transformers_layout(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = entropy_blt(cross_attn_k=4, dim_global=48, ffn_dim_global=96)
    from blt.weights.hf import save_hf

    save_hf(model, tmp_path / "hf")
    hf = transformers.BltForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = hf(IDS, use_cache=False).logits
    assert (out - model(IDS)).abs().max() < 1e-4
    # and back again through our loader
    assert (blt.load_pretrained(tmp_path / "hf")(IDS) - model(IDS)).abs().max() < 1e-5


# ---- the release's layouts, written by the test from a transformers model -------------------
# transformers' conversion script documents how release names become transformers names; the test
# inverts that table on its own, so our loader is checked against an independent mapping.
HF_TO_RELEASE = [
    (".self_attn.", ".attention."),
    (".mlp.", ".feed_forward."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".embed_tokens.", ".tok_embeddings."),
    (".q_norm.", ".cross_attn_norm_q."),
    (".k_norm.", ".cross_attn_norm_kv."),
    (".gate_proj.", ".w1."),
    (".down_proj.", ".w2."),
    (".up_proj.", ".w3."),
    (".q_proj.", ".wq."),
    (".k_proj.", ".wk."),
    (".v_proj.", ".wv."),
    (".o_proj.", ".wo."),
    (".lm_head.", ".output."),
]


def release_state(hf_state, n_tables, table_size):
    blt_state, entropy_state = {}, {}
    for name, tensor in hf_state.items():
        if name == "lm_head.weight":
            blt_state["local_decoder.output.weight"] = tensor
            continue
        if name == "model.encoder_hash_tok_embedding.weight":
            for i in range(n_tables):
                blt_state[f"encoder_hash_tok_embedding.{i}.weight"] = tensor[
                    i * table_size : (i + 1) * table_size
                ].clone()
            continue
        new = "." + name.removeprefix("model.")
        for a, b in HF_TO_RELEASE:
            new = new.replace(a, b)
        new = new[1:]
        if new.startswith("patcher."):
            entropy_state[new.removeprefix("patcher.")] = tensor
        else:
            blt_state[new] = tensor
    return blt_state, entropy_state


def release_args(hf_cfg, threshold):
    enc, dec, glb = hf_cfg.encoder_config, hf_cfg.decoder_config, hf_cfg.global_config
    return dict(
        dim=glb.hidden_size,
        vocab_size=260,
        dim_global=glb.hidden_size,
        n_layers_global=glb.num_hidden_layers,
        n_heads_global=glb.num_attention_heads,
        dim_local_encoder=enc.hidden_size,
        n_layers_local_encoder=enc.num_hidden_layers,
        n_heads_local_encoder=enc.num_attention_heads,
        dim_local_decoder=dec.hidden_size,
        n_layers_local_decoder=dec.num_hidden_layers,
        n_heads_local_decoder=dec.num_attention_heads,
        cross_attn_encoder=True,
        cross_attn_decoder=True,
        cross_attn_k=hf_cfg.cross_attn_k,
        cross_attn_nheads=enc.num_attention_heads,
        cross_attn_all_layers_encoder=enc.cross_attn_all_layers,
        cross_attn_all_layers_decoder=dec.cross_attn_all_layers,
        cross_attn_init_by_pooling=True,
        cross_attn_window_encoder=None,
        cross_attn_window_decoder=None,
        encoder_hash_byte_group_size=hf_cfg.encoder_hash_byte_group_size,
        encoder_hash_byte_group_vocab=hf_cfg.encoder_hash_byte_group_vocab,
        encoder_hash_byte_group_nb_functions=hf_cfg.encoder_hash_byte_group_nb_functions,
        local_attention_window_len=hf_cfg.local_attention_window_len,
        max_seqlen=512,
        max_encoder_seq_length=2048,
        rope_theta=500000.0,
        norm_eps=1e-5,
        multiple_of=64,
        ffn_dim_multiplier=1.0,
        use_rope=True,
        patch_in_forward=True,
        patching_mode="entropy",
        patching_threshold=threshold,
        attn_bias_type="causal",
        downsampling_by_pooling="max",
        non_linearity="swiglu",
        norm_type="rmsnorm",
        share_encoder_decoder_emb=True,
    )


@pytest.fixture
def hf_reference(tmp_path):
    """A transformers BLT with release-style FFN widths (multiple_of=64 of 8/3 * dim)."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import hf_config

    cfg = hf_config(enc_layers=2, n_hash=2)
    for sub, dim in (
        (cfg.encoder_config, 32),
        (cfg.decoder_config, 32),
        (cfg.global_config, 64),
        (cfg.patcher_config, 32),
    ):
        sub.intermediate_size = 64 * ((int(8 * dim / 3) + 63) // 64)  # the release's rule
    torch.manual_seed(0)
    hf = transformers.BltForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.patcher.lm_head.weight.mul_(12.0)
    with torch.no_grad():
        ent = hf.model.patcher(IDS)[0].flatten().sort().values  # transformers' own entropies
    i = len(ent) // 2 + int((ent[len(ent) // 2 + 1 :] - ent[len(ent) // 2 : -1]).argmax())
    hf.config.patching_threshold = float((ent[i] + ent[i + 1]) / 2)
    with torch.no_grad():
        logits = hf(IDS, use_cache=False).logits
    return hf, logits


def entropy_args(cfg):
    p = cfg.patcher_config
    return dict(
        dim=p.hidden_size,
        n_layers=p.num_hidden_layers,
        n_heads=p.num_attention_heads,
        vocab_size=260,
        max_seqlen=8192,
        ffn_dim_multiplier=1.0,
        multiple_of=64,
        sliding_window=p.sliding_window,
        rope_theta=10000.0,
    )


@pytest.mark.parametrize("layout", ["hub", "consolidated"])
def test_release_layouts_load_with_the_right_mapping(tmp_path, hf_reference, layout):
    hf, expected = hf_reference
    cfg = hf.config
    n_tables = cfg.encoder_hash_byte_group_nb_functions * len(cfg.encoder_hash_byte_group_size)
    blt_state, entropy_state = release_state(hf.state_dict(), n_tables, cfg.encoder_hash_byte_group_vocab)
    args = release_args(cfg, cfg.patching_threshold)
    root = tmp_path / "release"
    (root / "entropy_model").mkdir(parents=True)
    patcher_args = {"patching_mode": "entropy", "threshold": cfg.patching_threshold, "patch_size": 4.5}
    if layout == "hub":
        (root / "config.json").write_text(json.dumps({"args": args}))
        save_file({k: v.contiguous() for k, v in blt_state.items()}, str(root / "model.safetensors"))
    else:
        (root / "params.json").write_text(json.dumps({"model": args, "data": {"patcher_args": patcher_args}}))
        torch.save({"model": blt_state}, root / "consolidated.pth")
    (root / "entropy_model" / "params.json").write_text(
        json.dumps({"entropy_model": entropy_args(cfg), "data": {"patcher_args": patcher_args}})
    )
    torch.save({"model": entropy_state}, root / "entropy_model" / "consolidated.pth")

    model = blt.load_pretrained(root)
    assert model.config.multiple_of == 64 and model.config.ffn_dims == (128, 192, 128)
    assert model.patcher.threshold == pytest.approx(cfg.patching_threshold)
    assert (model(IDS) - expected).abs().max() < 1e-4
    # the consolidated file must be read with weights_only=True: a pickled object is refused
    if layout == "consolidated":
        torch.save({"model": blt_state, "evil": object()}, root / "consolidated.pth")
        with pytest.raises(blt.BltError, match="weights_only=True"):
            blt.load_pretrained(root)


def test_release_unsupported_settings_are_named():
    from blt.weights.release import config_from_release

    with pytest.raises(blt.BltError, match="cross_attn_window_encoder=512"):
        config_from_release({"cross_attn_window_encoder": 512})
    with pytest.raises(blt.BltError, match="use_rope=False"):
        config_from_release({"use_rope": False})


# ---- broken directories -----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    blt.BLT(tiny_config()).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_path(tmp_path):
    with pytest.raises(blt.BltError, match="does not exist"):
        blt.load_pretrained(tmp_path / "nope")


def test_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(blt.BltError, match="no config.json or params.json"):
        blt.load_pretrained(tmp_path / "empty")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f.txt").write_text("hi")
    with pytest.raises(blt.BltError, match="not a directory"):
        blt.load_pretrained(tmp_path / "f.txt")


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(blt.BltError, match=re.escape(str(saved / "model.safetensors")) + " is missing"):
        blt.load_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(blt.BltError, match="model.safetensors is not a readable safetensors file"):
        blt.load_pretrained(saved)


def test_mismatched_shapes_name_the_tensor(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["ffn_dim_global"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        blt.BltError,
        match=r"global_transformer\.layers\.0\.ffn\.w1\.weight has shape \[128, 64\], the config expects \[96, 64\]",
    ):
        blt.load_pretrained(saved)


def test_missing_and_unexpected_tensors(saved):
    state = load_file(saved / "model.safetensors")
    state.pop("local_decoder.norm.weight")
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(blt.BltError, match=r"missing tensor\(s\) local_decoder\.norm\.weight"):
        blt.load_pretrained(saved)
    state["local_decoder.norm.weight"] = torch.ones(32)
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(blt.BltError, match=r"unexpected tensor\(s\) extra\.weight"):
        blt.load_pretrained(saved)


def test_bad_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(blt.BltError, match="config.json is not valid JSON"):
        blt.load_pretrained(saved)
