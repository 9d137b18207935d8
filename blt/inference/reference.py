"""The exact reference for generation: run the whole model over the whole prefix for every new byte, as the
release does. The cached engine must produce exactly what this produces."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blt.inference.sampling import StopChecker, allowed_ids, check_generation_args, row_generators, sample_next
from blt.tokenizer import EOS_ID, OFFSET, VOCAB_SIZE


@torch.no_grad()
def generate_recompute(
    model,
    prompts: Sequence[str | bytes],
    max_new_bytes: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str | bytes] | None = None,
    stop_at_eos: bool = True,
    return_logits: bool = False,
):
    """Generate by running the full model over the full prefix for every byte (the exact reference)."""
    prompts = check_generation_args(prompts, max_new_bytes, temperature, top_k, top_p)
    device = next(model.parameters()).device
    bpe = getattr(model.patcher, "mode", None) == "bpe"
    allowed = allowed_ids(stop_at_eos, bpe, device)
    stopper = StopChecker(stop)
    outputs, all_logits = [], []
    for prompt in prompts:
        generators = row_generators(seed, 1)
        ids = model.encode(prompt).tolist()
        new, steps = bytearray(), []
        while len(new) < max_new_bytes:
            logits = model(torch.tensor([ids], device=device))[0, -1]
            steps.append(logits.float().cpu())
            nxt = int(sample_next(logits[None], allowed, temperature, top_k, top_p, generators)[0])
            if nxt == EOS_ID:
                break
            ids.append(nxt)
            if nxt >= OFFSET:
                new.append(nxt - OFFSET)
                keep = stopper.cut(bytes(new))
                if keep is not None:
                    del new[keep:]
                    break
        outputs.append(bytes(new))
        all_logits.append(torch.stack(steps) if steps else torch.zeros(0, VOCAB_SIZE))
    return (outputs, all_logits) if return_logits else outputs
