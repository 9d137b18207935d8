"""FLOP-matched comparison on your own data: BLT against a BPE token model and a byte model.

For each training-FLOP budget every model is sized by one rule, trained for exactly that budget with
the same loop, and scored on the held-out split in bits per byte, cleanly and under seeded noise.

Sizing rule, the same for every model. A model is a shape of one width d:
- the trunk (the BPE and byte models' transformer, BLT's global transformer) has max(2, d/64) layers
  of width d, d/32 heads of 32, and a SwiGLU of ~8d/3;
- BLT's local encoder (1 layer) and decoder (2 layers) have width max(64, d/2) and k = 2, so a patch
  enters the trunk as a d-wide vector; hash n-grams 3..8 in 4096-row tables.
The width follows the compute-optimal recipe the paper builds on (Chinchilla): the trunk's units
(tokens, bytes or patches) D = 20 N for N trunk parameters, so a width costs C(d) = (training FLOPs
per unit) x 20 N(d), and the grid width whose C(d) is closest to the budget (in log) is chosen. The
number of steps is then budget / (training FLOPs per step): every run spends its budget, to within
rounding to whole steps. FLOPs are `blt.flops` counts; for entropy patching they include the entropy
model's forward pass over the training bytes (its own training, shared by all budgets, is not counted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blt.bpe import load_bpe, train_bpe
from blt.config import BLTConfig, EntropyModelConfig, PatchingConfig, ffn_hidden_dim
from blt.errors import BltError
from blt.experiments.baselines import lm_config, token_byte_lengths, token_stream, token_vocab_size
from blt.experiments.noise import PERTURBATIONS, perturb
from blt.flops import entropy_model_flops, flops_per_byte
from blt.model.blt import init_weights
from blt.model.patching import EntropyPatcher, SpacePatcher, StaticPatcher, threshold_for_mean_patch
from blt.rundir import claim, remove_own
from blt.training.data import Document, PackedSequences, build_stream, read_documents, split_documents, stream_entropies
from blt.training.evaluate import evaluate_stream
from blt.training.loop import TrainConfig, train_loop
from blt.training.recipes import blt_forward, lm_forward
from blt.weights import BLT, EntropyModel, load_entropy_model

MODELS = ("bpe", "byte", "blt-static", "blt-space", "blt-entropy")
WIDTHS = tuple(range(64, 1025, 32))
TOKENS_PER_PARAM = 20
MIN_STEPS = 20
STATIC_PATCH = 4
TARGET_PATCH_BYTES = 4.5
NOISE_BYTES = 20_000
# the entropy model of `blt-entropy`: kept small, as in the paper (its forward pass is counted in the
# training and inference FLOPs; its own training, shared by every budget, is not)
ENTROPY_CONFIG = EntropyModelConfig(dim=64, n_layers=2, n_heads=2, ffn_dim=192, sliding_window=256, max_seqlen=8192)


def trunk(width: int) -> tuple[int, int, int]:
    """Layers, heads and SwiGLU width of a trunk of width d."""
    return max(2, width // 64), width // 32, ffn_hidden_dim(width, multiple_of=32)


def local_width(width: int) -> int:
    return max(64, width // 2 // 32 * 32)


def blt_config(width: int, patching: PatchingConfig, seq_len: int) -> BLTConfig:
    layers, heads, ffn = trunk(width)
    local = local_width(width)
    return BLTConfig(
        dim_local_encoder=local,
        n_layers_local_encoder=1,
        n_heads_local_encoder=local // 32,
        dim_global=width,
        n_layers_global=layers,
        n_heads_global=heads,
        dim_local_decoder=local,
        n_layers_local_decoder=2,
        n_heads_local_decoder=local // 32,
        ffn_dim_local_encoder=ffn_hidden_dim(local, multiple_of=32),
        ffn_dim_global=ffn,
        ffn_dim_local_decoder=ffn_hidden_dim(local, multiple_of=32),
        cross_attn_k=2,
        cross_attn_nheads=local // 32,
        local_attention_window_len=512,
        encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
        encoder_hash_byte_group_vocab=4096,
        max_seqlen=seq_len + 1,
        max_encoder_seq_length=seq_len,
        patching=patching,
    )


@dataclass
class DataStats:
    """What sizing needs to know about the data: bytes per BPE token and per patch of each patcher."""

    bytes_per_token: float
    bytes_per_patch: dict[str, float]
    bpe_vocab: int
    entropy_flops_per_byte: float = 0.0  # the entropy model's forward pass, paid by entropy patching


@dataclass
class Plan:
    model: str
    budget: float
    width: int
    steps: int
    flops_per_step: float
    trunk_params: int
    bytes_per_unit: float

    @property
    def name(self) -> str:
        return f"{self.model}-{self.budget:.0e}"

    @property
    def train_flops(self) -> float:
        return self.steps * self.flops_per_step


def _trunk_params(layers: int, width: int, heads: int, ffn: int) -> int:
    return layers * (4 * width * width + 3 * width * ffn + 2 * width)


def unit_cost(model: str, width: int, stats: DataStats, seq_len: int) -> tuple[float, float, int]:
    """(training FLOPs per trunk unit, bytes per unit, trunk parameters) of `model` at width d."""
    layers, heads, ffn = trunk(width)
    params = _trunk_params(layers, width, heads, ffn)
    if model == "byte":
        cfg = lm_config(width, layers, heads, ffn, 260, 512, seq_len)
        return 3 * entropy_model_flops(cfg, seq_len), 1.0, params
    if model == "bpe":
        tokens = max(1, round(seq_len / stats.bytes_per_token))
        cfg = lm_config(width, layers, heads, ffn, stats.bpe_vocab, None, tokens)
        return 3 * entropy_model_flops(cfg, tokens), stats.bytes_per_token, params
    patch = stats.bytes_per_patch[model]
    per_byte = flops_per_byte(blt_config(width, PatchingConfig(mode="byte"), seq_len), seq_len, patch)["training_total"]
    if model == "blt-entropy":
        per_byte += stats.entropy_flops_per_byte
    return per_byte * patch, patch, params


def plan(model: str, budget: float, stats: DataStats, seq_len: int, batch_size: int) -> Plan:
    """Size `model` for `budget` training FLOPs by the rule in the module docstring."""
    if model not in MODELS:
        raise BltError(f"unknown model {model!r}; valid models: {', '.join(MODELS)}")
    best = None
    for width in WIDTHS:
        per_unit, unit_bytes, params = unit_cost(model, width, stats, seq_len)
        optimal = per_unit * TOKENS_PER_PARAM * params
        gap = abs(math.log(optimal / budget))
        if best is None or gap < best[0]:
            best = (gap, width, per_unit, unit_bytes, params)
    _, width, per_unit, unit_bytes, params = best
    per_step = per_unit * batch_size * seq_len / unit_bytes
    smallest = unit_cost(model, WIDTHS[0], stats, seq_len)
    minimum = MIN_STEPS * smallest[0] * batch_size * seq_len / smallest[1]
    if budget < minimum:
        raise BltError(
            f"budget {budget:.2e} FLOPs is too small for {model}: its smallest size (width {WIDTHS[0]}) needs at least "
            f"{minimum:.2e} FLOPs for {MIN_STEPS} steps of {batch_size} x {seq_len} bytes"
        )
    return Plan(model, budget, width, max(1, round(budget / per_step)), per_step, params, unit_bytes)


def learning_rate(width: int) -> float:
    return min(4e-3, 2e-3 * (256 / width) ** 0.5)


# ---- running --------------------------------------------------------------------------------------
class Workspace:
    """Everything shared by the runs of one comparison: data, tokenizer, entropy model, patchers."""

    def __init__(
        self,
        data: list[str],
        out: Path,
        seq_len: int,
        bpe_vocab: int,
        val_fraction: float,
        split: str,
        entropy_steps: int,
        progress: bool,
        text_field: str = "text",
        max_bytes: int | None = None,
    ):
        docs = read_documents(data, text_field, max_bytes)
        self.train_docs, self.val_docs = split_documents(docs, val_fraction, split)
        self.out, self.seq_len, self.progress = out, seq_len, progress
        out.mkdir(parents=True, exist_ok=True)
        self.train_bytes, self.val_bytes = build_stream(self.train_docs), build_stream(self.val_docs)
        tok_path = out / "bpe_tokenizer.json"
        self.tokenizer = (
            load_bpe(tok_path) if tok_path.exists() else train_bpe((d.data for d in self.train_docs), bpe_vocab)
        )
        self.tokenizer.save(str(tok_path))
        self.train_tokens, self.val_tokens = (
            token_stream(self.tokenizer, self.train_docs),
            token_stream(self.tokenizer, self.val_docs),
        )
        self.token_bytes = token_byte_lengths(self.tokenizer)
        self.entropy_model = self._entropy_model(data, entropy_steps, val_fraction, split)
        self.train_ent = stream_entropies(self.entropy_model, self.train_bytes, progress=progress)
        self.val_ent = stream_entropies(self.entropy_model, self.val_bytes, progress=progress)
        rows = [
            torch.from_numpy(self.train_ent[s : s + seq_len].copy())
            for s in range(0, min(len(self.train_ent), 256 * seq_len), seq_len)
        ]
        theta = threshold_for_mean_patch(rows, TARGET_PATCH_BYTES)
        self.patchers = {
            "blt-static": StaticPatcher(STATIC_PATCH),
            "blt-space": SpacePatcher(),
            "blt-entropy": EntropyPatcher(self.entropy_model, theta),
        }
        sample = torch.from_numpy(self.train_bytes[: 64 * seq_len].astype(np.int64)).view(-1, seq_len)
        ent = torch.from_numpy(self.train_ent[: 64 * seq_len].copy()).view(-1, seq_len)
        self.stats = DataStats(
            bytes_per_token=int(self.token_bytes[torch.from_numpy(self.train_tokens.astype(np.int64))].sum())
            / max(1, int((self.train_tokens >= 4).sum())),
            bytes_per_patch={
                name: sample.numel() / int(p(sample, ent)[:, :seq_len].sum())
                if p.uses_entropy
                else sample.numel() / int(p(sample)[:, :seq_len].sum())
                for name, p in self.patchers.items()
            },
            bpe_vocab=token_vocab_size(self.tokenizer),
            entropy_flops_per_byte=entropy_model_flops(self.entropy_model.config, seq_len),
        )

    def _entropy_model(self, data, steps, val_fraction, split) -> EntropyModel:
        path = self.out / "entropy"
        if not (path / "model.safetensors").exists():
            remove_own(path, "compare-entropy")
            claim(path, "compare-entropy", "blt compare")
            torch.manual_seed(0)
            model = EntropyModel(ENTROPY_CONFIG)
            init_weights(model)
            cfg = TrainConfig(
                seq_len=256,
                batch_size=16,
                lr=4e-3,
                warmup_steps=min(30, steps),
                max_steps=steps,
                eval_every=10**9,
                ckpt_every=10**9,
                log_every=max(1, steps // 50),
            )
            train_loop(
                model, PackedSequences(self.train_bytes, cfg.seq_len), cfg, path, lm_forward, progress=self.progress
            )
            model.save_pretrained(path)
        return load_entropy_model(path)

    def run(self, p: Plan, batch_size: int, seq_len: int) -> dict:
        """Train and evaluate one plan (or read its finished result); the trained model is saved in the run's
        folder (`runs/<model>-<budget>/`, loadable with `blt.load_pretrained`)."""
        out = self.out / "runs" / p.name
        summary = out / "summary.json"
        if summary.exists():
            return json.loads(summary.read_text())
        remove_own(out, "compare-run")  # an unfinished run starts over: its budget is spent in one go
        claim(out, "compare-run", "blt compare")
        cfg = TrainConfig(
            seq_len=seq_len,
            batch_size=batch_size,
            lr=learning_rate(p.width),
            warmup_steps=max(1, min(100, p.steps // 10)),
            max_steps=p.steps,
            eval_every=10**9,
            ckpt_every=10**9,
            log_every=max(1, p.steps // 50),
        )
        torch.manual_seed(cfg.seed)
        layers, heads, ffn = trunk(p.width)
        if p.model in ("byte", "bpe"):
            tokens = p.model == "bpe"
            length = max(1, round(seq_len / self.stats.bytes_per_token)) if tokens else seq_len
            model = EntropyModel(
                lm_config(
                    p.width,
                    layers,
                    heads,
                    ffn,
                    self.stats.bpe_vocab if tokens else 260,
                    None if tokens else 512,
                    length,
                )
            )
            init_weights(model)
            cfg = dataclasses.replace(cfg, seq_len=length)
            train, val = (self.train_tokens, self.val_tokens) if tokens else (self.train_bytes, self.val_bytes)
            start = time.time()
            train_loop(model, PackedSequences(train, length), cfg, out, lm_forward, progress=self.progress)
            wall = time.time() - start
            lengths = self.token_bytes if tokens else None
            result = evaluate_stream(model, val, length, bytes_per_id=lengths)
            inference = entropy_model_flops(model.config, length) / p.bytes_per_unit
            unit_bytes = self.stats.bytes_per_token if tokens else 1.0
            noise = self._noise(
                lambda docs: evaluate_stream(
                    model,
                    token_stream(self.tokenizer, docs) if tokens else build_stream(docs),
                    length,
                    bytes_per_id=lengths,
                )["bpb"]
            )
        else:
            patcher = self.patchers[p.model]
            config = blt_config(
                p.width,
                PatchingConfig(
                    mode=patcher.mode, patch_size=STATIC_PATCH, threshold=getattr(patcher, "threshold", None)
                ),
                seq_len,
            )
            model = BLT(config, patcher=patcher)
            uses_entropy = patcher.uses_entropy
            start = time.time()
            train_loop(
                model,
                PackedSequences(self.train_bytes, seq_len, self.train_ent if uses_entropy else None),
                cfg,
                out,
                blt_forward(patcher),
                progress=self.progress,
            )
            wall = time.time() - start
            result = evaluate_stream(model, self.val_bytes, seq_len, entropies=self.val_ent if uses_entropy else None)
            unit_bytes = result["mean_patch_bytes"]
            report = flops_per_byte(config, seq_len, unit_bytes, self.entropy_model.config if uses_entropy else None)
            inference = report["inference_total"]

            def bpb(docs):
                stream = build_stream(docs)
                ent = stream_entropies(self.entropy_model, stream) if uses_entropy else None
                return evaluate_stream(model, stream, seq_len, entropies=ent)["bpb"]

            noise = self._noise(bpb)
        record = {
            "run": p.name,  # the folder under runs/ that holds the trained model
            "model": p.model,
            "budget": p.budget,
            "width": p.width,
            "trunk_params": p.trunk_params,
            "params": sum(t.numel() for t in model.parameters()),
            "steps": p.steps,
            "train_flops": p.train_flops,
            "bpb": result["bpb"],
            "inference_flops_per_byte": inference,
            "bytes_per_unit": unit_bytes,
            "wall_seconds": wall,
            "noise": noise,
        }
        model.save_pretrained(out)  # kept for what comes after the comparison (e.g. generation speed)
        summary.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def noise_docs(self) -> list[Document]:
        """The first ~20 KB of the held-out split: the clean text the perturbations start from."""
        docs, total = [], 0
        for d in self.val_docs:
            docs.append(Document(d.name, d.data[: NOISE_BYTES - total]))
            total += len(docs[-1].data)
            if total >= NOISE_BYTES:
                break
        return docs

    def _noise(self, bpb) -> dict[str, float]:
        clean = self.noise_docs()
        scores = {"clean": bpb(clean)}
        for kind in PERTURBATIONS:
            noisy = [
                Document(d.name, perturb(d.data.decode("utf-8", errors="replace"), kind, seed=0).encode())
                for d in clean
            ]
            scores[kind] = bpb(noisy)
        return scores


def check_fingerprint(
    out: Path,
    data,
    seq_len,
    batch_size,
    bpe_vocab,
    val_fraction,
    split,
    entropy_steps,
    text_field="text",
    max_bytes=None,
) -> None:
    """Results in `out` are reused only when computed on the same data with the same settings: the first run
    writes `fingerprint.json` (a hash of every document and the settings); a later one must match it."""
    h = hashlib.sha256()
    for d in read_documents(data, text_field, max_bytes):
        h.update(hashlib.sha256(d.data).digest())
    now = {
        "data_sha256": h.hexdigest(),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "bpe_vocab": bpe_vocab,
        "val_fraction": val_fraction,
        "split": split,
        "entropy_steps": entropy_steps,
    }
    path = out / "fingerprint.json"
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        diffs = [f"{k} (stored {before.get(k)!r}, now {v!r})" for k, v in now.items() if before.get(k) != v]
        if diffs:
            raise BltError(
                f"{out} holds results computed with other data or settings: {'; '.join(diffs)}; choose another --out"
            )
    elif any(p.name not in (".blt-run", "fingerprint.json") for p in out.iterdir()):
        raise BltError(f"{out} holds results without a fingerprint of their data; choose another --out")
    else:
        path.write_text(json.dumps(now, indent=2) + "\n")


def run_compare(
    data: list[str],
    budgets: list[float],
    models: list[str],
    out: str | Path,
    seq_len: int = 512,
    batch_size: int = 8,
    bpe_vocab: int = 1024,
    val_fraction: float = 0.1,
    split: str = "auto",
    entropy_steps: int = 300,
    progress: bool = True,
    title: str | None = None,
    report: str | Path | None = None,
    text_field: str = "text",
    max_bytes: int | None = None,
) -> list[dict]:
    """Run (or read back) every plan and write the report to `report` (.md, -train.png, -inference.png;
    default `out`/compare). `text_field` and `max_bytes` are `read_documents`'s."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise BltError(f"unknown model(s) {', '.join(unknown)}; valid models: {', '.join(MODELS)}")
    if not budgets or any(b <= 0 for b in budgets):
        raise BltError("budgets must be positive FLOP counts, e.g. 1e13,3e13")
    out = Path(out)
    claim(out, "compare", "blt compare")  # refuses a folder compare did not make
    check_fingerprint(
        out, data, seq_len, batch_size, bpe_vocab, val_fraction, split, entropy_steps, text_field, max_bytes
    )
    ws = Workspace(data, out, seq_len, bpe_vocab, val_fraction, split, entropy_steps, progress, text_field, max_bytes)
    plans = [
        plan(m, b, ws.stats, seq_len, batch_size) for b in sorted(budgets) for m in models
    ]  # all sized first: bad budgets fail fast
    results = []
    for i, p in enumerate(plans, 1):
        if progress:
            print(f"[{i}/{len(plans)}] {p.model} at {p.budget:.1e} FLOPs: width {p.width}, {p.steps} steps", flush=True)
        results.append(ws.run(p, batch_size, seq_len))
    stem = Path(report).with_suffix("") if report else out / "compare"
    write_report(results, ws, stem, data, title or "FLOP-matched comparison", seq_len, batch_size, split, val_fraction)
    return results


# ---- report -------------------------------------------------------------------------------------
def write_report(
    results: list[dict],
    ws: Workspace,
    stem: Path,
    data,
    title: str,
    seq_len: int,
    batch_size: int,
    split: str,
    val_fraction: float,
) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot_results(results, stem)
    lines = [
        f"# {title}",
        "",
        f"Data: {', '.join(map(str, data))}; held out: {split} split, {val_fraction:.0%} "
        f"({len(ws.val_bytes):,} ids of validation, {len(ws.train_bytes):,} of training).",
        f"Training: {batch_size} sequences of {seq_len} bytes per step; sizing rule and FLOP accounting in "
        "`blt/experiments/compare.py`.",
        f"BPE: {ws.stats.bpe_vocab - 4} tokens trained on the training split, {ws.stats.bytes_per_token:.2f} "
        "bytes per token. "
        f"Patches: static {STATIC_PATCH}, space {ws.stats.bytes_per_patch['blt-space']:.2f}, entropy "
        f"{ws.stats.bytes_per_patch['blt-entropy']:.2f} bytes on average.",
        "",
        "| model | budget (FLOPs) | width | params | steps | bpb | training FLOPs used | inference "
        "FLOPs/byte | bytes per patch/token | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["budget"], MODELS.index(r["model"]))):
        lines.append(
            f"| {r['model']} | {r['budget']:.1e} | {r['width']} | {r['params'] / 1e6:.2f} M | {r['steps']} | "
            f"{r['bpb']:.3f} | "
            f"{r['train_flops']:.2e} | {r['inference_flops_per_byte']:.2e} | {r['bytes_per_unit']:.2f} | "
            f"{r['wall_seconds'] / 60:.1f} min |"
        )
    kinds = ["clean", *PERTURBATIONS]
    lines += [
        "",
        "## Noise robustness",
        "",
        f"bpb on the first {NOISE_BYTES // 1000} KB of the held-out text, clean and perturbed "
        "(seed 0; `blt/experiments/noise.py`: random case 20% of letters, drop 5% of characters, repeat 5%, "
        "spaced-out upper-case letters in 20% of words). "
        "In brackets: the increase over clean.",
        "",
        "| model | budget | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for r in sorted(results, key=lambda r: (r["budget"], MODELS.index(r["model"]))):
        n = r["noise"]
        cells = [f"{n['clean']:.3f}"] + [f"{n[k]:.3f} (+{n[k] - n['clean']:.3f})" for k in PERTURBATIONS]
        lines.append(f"| {r['model']} | {r['budget']:.1e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![bpb against training FLOPs]({stem.name}-train.png)",
        "",
        f"![bpb against inference FLOPs per byte]({stem.name}-inference.png)",
        "",
    ]
    (stem.with_suffix(".md")).write_text("\n".join(lines))


def plot_results(results: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, suffix in (
        ("train_flops", "training FLOPs", "train"),
        ("inference_flops_per_byte", "inference FLOPs per byte", "inference"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for model in MODELS:
            rs = sorted((r for r in results if r["model"] == model), key=lambda r: r[key])
            if rs:
                ax.plot([r[key] for r in rs], [r["bpb"] for r in rs], marker="o", label=model)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{stem}-{suffix}.png", dpi=110)
        plt.close(fig)
