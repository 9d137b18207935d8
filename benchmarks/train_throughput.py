"""Training throughput: a BLT training step against transformers' BltForCausalLM forward+backward on
the same config, weights, batch and patches, and against a plain byte transformer, in one run.

Reports bytes/s and achieved FLOP/s (useful FLOPs counted the paper's way by `blt.flops`, divided by
wall time) and writes benchmarks/results/train_throughput.json.

    python benchmarks/train_throughput.py [--preset small] [--settings 2048x4,4096x2] [--steps 5]

Each setting is SEQ_LEN x BATCH (the same 8192 bytes per batch by default): BLT is meant for long
byte sequences (the release trains on 8k-16k bytes), where dense masked attention costs most.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import blt
from blt.config import EntropyModelConfig, PatchingConfig
from blt.flops import entropy_model_flops, flops_per_byte
from blt.model.blt import init_weights
from blt.model.patching import SpacePatcher, starts_to_lengths
from blt.presets import blt_preset
from blt.weights.hf import save_hf

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def corpus_batch(batch: int, seq_len: int) -> torch.Tensor:
    from blt.experiments.corpus import stdlib_corpus

    text = "\n\n".join(t for _, t in stdlib_corpus()).encode()
    rows = [blt.encode(text[i * seq_len * 3 : i * seq_len * 3 + seq_len - 1]) for i in range(batch)]
    return torch.stack(rows)


def measure(preset: str, seq_len: int, batch: int, steps: int) -> dict:
    from transformers import BltForCausalLM

    torch.manual_seed(0)
    # transformers uses the local head count for cross-attention: match it so both run the same model
    config, _ = blt_preset(preset, PatchingConfig(mode="space"))
    config.cross_attn_nheads = None
    model = blt.BLT(config, patcher=SpacePatcher())
    ids = corpus_batch(batch, seq_len + 1)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    starts = model.patch_starts(inputs)
    lengths = starts_to_lengths(starts)  # include-next-byte form: both models get the same patches
    mean_patch = inputs.numel() / int(starts[:, :seq_len].sum())
    n_bytes = inputs.numel()
    useful = flops_per_byte(config, seq_len, mean_patch)["training_total"] * n_bytes

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def ours_fwd_bwd():
        loss = F.cross_entropy(model(inputs, patch_starts=starts).flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def ours_step():
        loss = F.cross_entropy(model(inputs, patch_starts=starts).flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = BltForCausalLM.from_pretrained(tmp).train()
    with torch.no_grad():  # the same model on both sides
        a = model(inputs[:1, :256], patch_lengths=starts_to_lengths(model.patch_starts(inputs[:1, :256])))
        b = hf(
            inputs[:1, :256], patch_lengths=starts_to_lengths(model.patch_starts(inputs[:1, :256])), use_cache=False
        ).logits
        agree = float((a - b).abs().max())

    def hf_fwd_bwd():
        out = hf(inputs, patch_lengths=lengths, use_cache=False).logits
        F.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
        hf.zero_grad(set_to_none=True)

    # plain byte transformers of the global transformer's width and depth, run once per byte instead of
    # once per patch: the entropy-model architecture (the same block, the same 512-byte sliding window
    # as every byte-level stack here; this is also the `byte` baseline) and a full-causal variant
    def plain_model(window):
        cfg = EntropyModelConfig(
            dim=config.dim_global,
            n_layers=config.n_layers_global,
            n_heads=config.n_heads_global,
            ffn_dim=config.ffn_dims[1],
            sliding_window=window,
            max_seqlen=seq_len,
        )
        m = blt.EntropyModel(cfg)
        init_weights(m)

        def fwd_bwd():
            F.cross_entropy(m(inputs).flatten(0, 1), targets.flatten()).backward()
            m.zero_grad(set_to_none=True)

        return cfg, fwd_bwd, 3 * entropy_model_flops(cfg, seq_len) * n_bytes

    plain_cfg, plain_fwd_bwd, plain_useful = plain_model(config.local_attention_window_len)
    causal_cfg, causal_fwd_bwd, causal_useful = plain_model(None)

    t_ours = timed(ours_fwd_bwd, steps)
    t_step = timed(ours_step, steps)
    t_hf = timed(hf_fwd_bwd, steps)
    t_plain = timed(plain_fwd_bwd, steps)
    t_causal = timed(causal_fwd_bwd, steps)

    result = {
        "benchmark": "train_throughput",
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": preset,
        "params": model.num_params(),
        "seq_len": seq_len,
        "batch": batch,
        "mean_patch_bytes": mean_patch,
        "logits_max_abs_diff_vs_transformers": agree,
        "ours_fwd_bwd": {"seconds": t_ours, "bytes_per_s": n_bytes / t_ours, "flop_per_s": useful / t_ours},
        "ours_train_step": {"seconds": t_step, "bytes_per_s": n_bytes / t_step, "flop_per_s": useful / t_step},
        "transformers_fwd_bwd": {"seconds": t_hf, "bytes_per_s": n_bytes / t_hf, "flop_per_s": useful / t_hf},
        "plain_byte_transformer_fwd_bwd": {
            "seconds": t_plain,
            "bytes_per_s": n_bytes / t_plain,
            "flop_per_s": plain_useful / t_plain,
            "config": plain_cfg.to_dict(),
        },
        "plain_full_causal_fwd_bwd": {
            "seconds": t_causal,
            "bytes_per_s": n_bytes / t_causal,
            "flop_per_s": causal_useful / t_causal,
            "config": causal_cfg.to_dict(),
        },
    }
    result["speedup_vs_transformers"] = t_hf / t_ours
    result["flop_per_s_ratio_vs_plain"] = (
        result["ours_fwd_bwd"]["flop_per_s"] / result["plain_byte_transformer_fwd_bwd"]["flop_per_s"]
    )
    result["flop_per_s_ratio_vs_full_causal"] = (
        result["ours_fwd_bwd"]["flop_per_s"] / result["plain_full_causal_fwd_bwd"]["flop_per_s"]
    )
    result["targets"] = {
        "speedup_vs_transformers >= 1.5": result["speedup_vs_transformers"] >= 1.5,
        "flop_per_s_ratio_vs_plain >= 0.8": result["flop_per_s_ratio_vs_plain"] >= 0.8,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--settings", default="2048x4,4096x2", help="comma-separated SEQ_LENxBATCH")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    cli = ap.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    runs = []
    for setting in cli.settings.split(","):
        seq_len, batch = (int(x) for x in setting.split("x"))
        result = measure(cli.preset, seq_len, batch, cli.steps)
        runs.append(result)
        keys = (
            "seq_len",
            "batch",
            "speedup_vs_transformers",
            "flop_per_s_ratio_vs_plain",
            "flop_per_s_ratio_vs_full_causal",
            "targets",
        )
        print(json.dumps({k: result[k] for k in keys}, indent=2))
        for name in (
            "ours_fwd_bwd",
            "ours_train_step",
            "transformers_fwd_bwd",
            "plain_byte_transformer_fwd_bwd",
            "plain_full_causal_fwd_bwd",
        ):
            r = result[name]
            print(
                f"{name:32s} {r['seconds']:.3f} s  {r['bytes_per_s'] / 1e3:8.1f} KB/s  "
                f"{r['flop_per_s'] / 1e9:7.1f} GFLOP/s"
            )
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text(json.dumps({"benchmark": "train_throughput", "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
