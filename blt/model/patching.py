"""Patchers (paper §2): where patches start.

Every patcher answers one question per position: does a new patch start here? The answer is a
boolean mask `starts` [B, T+1] over the T bytes *and the position of the byte after them*, because
the decoder needs to know, before that byte exists, whether it will open a new patch (the release
calls this `include_next_token`). Position 0 (BOS) is a patch of its own and position 1 always
starts a patch, as in the release. Every rule is incremental: whether position p starts a patch
depends only on ids before p, which is what makes the model causal and cached generation exact.

Rules, for p >= 2:
- `byte`:   every position.
- `static`: every `patch_size` bytes after the BOS patch.
- `space`:  after a space-like byte that does not follow another space-like byte, or after a special
            id (SpaceByte's rule as in the release; space-like = not an ASCII letter or digit and not a
            UTF-8 continuation byte).
- `bpe`:    right after a BPE delimiter id (see `blt.bpe.encode_with_delimiters`).
- `entropy`: from H[p-1], the entropy model's uncertainty about byte p:
    global threshold   H[p-1] > θ
    monotonic rule     H[p-1] - H[p-2] > θ (p = 2 always starts, as in the release)
    combination        H[p-1] > θ and H[p-1] - H[p-2] > θ_add (p = 2 always starts and p = 3
                       never does: the release's rule, kept as released)
`max_patch_length` then splits long patches every `max_patch_length` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from blt.bpe import encode_with_delimiters
from blt.config import PatchingConfig
from blt.errors import BltError
from blt.model.entropy_model import EntropyModel
from blt.tokenizer import BPE_ID, OFFSET, encode


def _first_two(starts: torch.Tensor) -> torch.Tensor:
    starts[:, :2] = True
    return starts


def limit_patch_length(starts: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """Add a start every `max_len` positions inside any longer patch."""
    if max_len is None:
        return starts
    pos = torch.arange(starts.shape[1], device=starts.device)
    last_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    offset = pos - last_start
    return starts | ((offset > 0) & (offset % max_len == 0))


def starts_to_lengths(starts: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Patch lengths [B, P] (right-padded with 0) of the first `length` positions of `starts`."""
    starts = starts[:, :length] if length is not None else starts
    patch = starts.long().cumsum(1) - 1
    num = int(patch[:, -1].max()) + 1 if starts.shape[1] else 0
    return torch.zeros(starts.shape[0], num, dtype=torch.long, device=starts.device).scatter_add_(
        1, patch, torch.ones_like(patch)
    )


def lengths_to_starts(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The `starts` mask [B, T+1] of explicit patch lengths [B, P] over T = `seq_len` bytes.

    Each row must sum to T (the byte after the sequence continues the last patch) or to T+1 (the
    release's include-next-token form, which says whether that byte opens a patch). Zeros may only pad
    the right; the first patch must be the BOS byte alone.
    """
    if lengths.dim() == 1:
        lengths = lengths.unsqueeze(0)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise BltError(f"patch_lengths must be an integer tensor, got {lengths.dtype}")
    lengths = lengths.long()
    if (lengths < 0).any():
        raise BltError("patch_lengths has negative entries")
    nonzero = lengths > 0
    if (nonzero[:, 1:] & ~nonzero[:, :-1]).any():
        raise BltError("patch_lengths may only be padded with zeros on the right")
    totals = lengths.sum(1)
    bad = ((totals != seq_len) & (totals != seq_len + 1)).nonzero()
    if len(bad):
        row = int(bad[0])
        raise BltError(
            f"patch_lengths row {row} sums to {int(totals[row])}; expected {seq_len} (the sequence length) or "
            f"{seq_len + 1}"
        )
    if seq_len > 0 and (lengths[:, 0] != 1).any():
        raise BltError("the first patch must hold the first byte (BOS) alone: patch_lengths[:, 0] must be 1")
    begin = (lengths.cumsum(1) - lengths).clamp(max=seq_len + 1)  # right padding lands past the end
    counts = torch.zeros(lengths.shape[0], seq_len + 2, dtype=torch.long, device=lengths.device)
    counts.scatter_add_(1, begin, nonzero.long())
    return _first_two(counts[:, : seq_len + 1] > 0)


def _previous_and_current(x: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position q = 0..T of a [B, T] sequence: x[q-2] and x[q-1] (`fill` where absent)."""
    pad = torch.full((x.shape[0], 2), fill, dtype=x.dtype, device=x.device)
    padded = torch.cat([pad, x], dim=1)  # padded[q + 1] = x[q - 1]
    return padded[:, :-1], padded[:, 1:]


def _spacelike(ids: torch.Tensor) -> torch.Tensor:
    b = ids - OFFSET
    return (
        (b < ord("0"))
        | ((b > ord("9")) & (b < ord("A")))
        | ((b > ord("Z")) & (b < ord("a")))
        | ((b > ord("z")) & (b < 0x80))
        | (b >= 0xC0)
    )


class Patcher:
    """Base class: `patcher(ids [B, T]) -> starts [B, T+1]`.

    A patcher is its `rule`: does position q (>= 2) start a patch, given the ids and entropies at
    q-2 and q-1? The same rule serves a whole sequence (`__call__`) and one next position during
    generation, so the two cannot disagree. It is not an `nn.Module`: a model that holds one moves the
    modules it names in `modules()` (the frozen entropy model) along with itself.
    """

    mode = "?"
    uses_entropy = False

    def __init__(self, max_patch_length: int | None = None):
        self.max_patch_length = max_patch_length

    def modules(self) -> list[nn.Module]:
        """The modules this patcher computes with (the entropy model, for entropy patching)."""
        return []

    def rule(self, prev_id, cur_id, prev_h, cur_h, q) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, text: str | bytes, bos: bool = True) -> torch.Tensor:
        """The ids this patcher expects for `text` (only `bpe` differs from `blt.encode`)."""
        return encode(text, bos=bos)

    def boundaries(self, ids: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        """`starts` [B, T+1] before `max_patch_length`."""
        batch, length = (ids if ids is not None else entropies).shape
        q = torch.arange(length + 1, device=(ids if ids is not None else entropies).device)
        prev_id, cur_id = _previous_and_current(ids, -1) if ids is not None else (None, None)
        prev_h, cur_h = _previous_and_current(entropies, float("nan")) if entropies is not None else (None, None)
        starts = (
            torch.as_tensor(self.rule(prev_id, cur_id, prev_h, cur_h, q), device=q.device)
            .expand(batch, length + 1)
            .clone()
        )
        return _first_two(starts)

    def __call__(self, ids: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        return limit_patch_length(self.boundaries(ids, entropies), self.max_patch_length)

    def patch_lengths(self, ids: torch.Tensor, include_next: bool = False) -> torch.Tensor:
        """Patch lengths [B, P] of the T bytes (T+1 positions with `include_next`), right-padded with 0."""
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        starts = self(ids)
        return starts_to_lengths(starts, None if include_next else ids.shape[1])


class BytePatcher(Patcher):
    mode = "byte"

    def rule(self, prev_id, cur_id, prev_h, cur_h, q):
        return torch.ones_like(q, dtype=torch.bool)


class StaticPatcher(Patcher):
    mode = "static"

    def __init__(self, patch_size: int, max_patch_length: int | None = None):
        super().__init__(max_patch_length)
        self.patch_size = int(patch_size)

    def rule(self, prev_id, cur_id, prev_h, cur_h, q):
        return (q - 1) % self.patch_size == 0


class SpacePatcher(Patcher):
    mode = "space"

    def rule(self, prev_id, cur_id, prev_h, cur_h, q):
        # the patch ends at q-1: a space-like byte after a non-space-like one, or a special id
        return (_spacelike(cur_id) & ~_spacelike(prev_id)) | (cur_id < OFFSET)


class BpePatcher(Patcher):
    """A patch per BPE token: the ids carry a delimiter before each token (`blt.bpe`)."""

    mode = "bpe"

    def __init__(self, tokenizer=None, max_patch_length: int | None = None):
        super().__init__(max_patch_length)
        self.tokenizer = tokenizer

    def encode(self, text, bos=True):
        if self.tokenizer is None:
            raise BltError("this bpe patcher has no tokenizer to insert delimiters with")
        return torch.tensor(encode_with_delimiters(self.tokenizer, text, bos=bos), dtype=torch.long)

    def rule(self, prev_id, cur_id, prev_h, cur_h, q):
        return cur_id == BPE_ID


def entropy_rule(prev_h, cur_h, q, threshold: float, threshold_add: float | None = None, monotonicity: bool = False):
    """Does position q start a patch, given H[q-2] and H[q-1]? (See the module docstring.)"""
    if monotonicity:
        return (q == 2) | (cur_h - prev_h > threshold)
    if threshold_add is not None:
        return (q == 2) | ((q >= 4) & (cur_h - prev_h > threshold_add) & (cur_h > threshold))
    return cur_h > threshold


def entropy_starts(
    entropies: torch.Tensor, threshold: float, threshold_add: float | None = None, monotonicity: bool = False
) -> torch.Tensor:
    """The `starts` mask [B, T+1] from entropies [B, T] (see the module docstring for the rules)."""
    q = torch.arange(entropies.shape[1] + 1, device=entropies.device)
    prev_h, cur_h = _previous_and_current(entropies, float("nan"))
    return _first_two(entropy_rule(prev_h, cur_h, q, threshold, threshold_add, monotonicity).clone())


class EntropyPatcher(Patcher):
    """Entropy patching with an entropy model, computed row by row (no context leaks across a batch)."""

    mode = "entropy"
    uses_entropy = True

    def __init__(
        self,
        entropy_model: EntropyModel,
        threshold: float,
        threshold_add: float | None = None,
        monotonicity: bool = False,
        max_patch_length: int | None = None,
    ):
        super().__init__(max_patch_length)
        self.entropy_model = entropy_model.eval().requires_grad_(False)
        self.threshold, self.threshold_add, self.monotonicity = threshold, threshold_add, monotonicity

    def rule(self, prev_id, cur_id, prev_h, cur_h, q):
        return entropy_rule(prev_h, cur_h, q, self.threshold, self.threshold_add, self.monotonicity)

    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        return self.entropy_model.entropies(ids)

    def starts_from_entropies(self, entropies: torch.Tensor) -> torch.Tensor:
        return self(None, entropies)

    def boundaries(self, ids, entropies=None):
        return super().boundaries(ids, self.entropies(ids) if entropies is None else entropies)

    def modules(self) -> list[nn.Module]:
        return [self.entropy_model]


def build_patcher(
    config: PatchingConfig, entropy_model: EntropyModel | None = None, bpe_tokenizer=None
) -> Patcher | None:
    """The patcher a config describes; None for `entropy` without an entropy model."""
    m = config.max_patch_length
    if config.mode == "byte":
        return BytePatcher(m)
    if config.mode == "static":
        return StaticPatcher(int(config.patch_size), m)
    if config.mode == "space":
        return SpacePatcher(m)
    if config.mode == "bpe":
        return BpePatcher(bpe_tokenizer, m)
    if entropy_model is None:
        return None
    if config.threshold is None:
        raise BltError(
            "entropy patching needs a threshold (the release's top-k mode is not incremental and is not supported)"
        )
    return EntropyPatcher(entropy_model, config.threshold, config.threshold_add, config.monotonicity, m)


@torch.no_grad()
def calibrate_threshold(
    entropy_model: EntropyModel,
    texts: Sequence[str | bytes | torch.Tensor],
    target_mean_patch_bytes: float,
    monotonicity: bool = False,
    threshold_add: float | None = None,
    max_patch_length: int | None = None,
) -> float:
    """The entropy threshold θ whose patches average `target_mean_patch_bytes` bytes on `texts`."""
    device = next(entropy_model.parameters()).device
    rows = [t if isinstance(t, torch.Tensor) else encode(t) for t in texts]
    if not rows or sum(len(r) for r in rows) == 0:
        raise BltError("calibrate_threshold needs at least one non-empty text")
    entropies = [entropy_model.entropies(r.to(device)[None])[0].cpu() for r in rows]
    return threshold_for_mean_patch(entropies, target_mean_patch_bytes, monotonicity, threshold_add, max_patch_length)


def threshold_for_mean_patch(
    entropies: Sequence[torch.Tensor],
    target_mean_patch_bytes: float,
    monotonicity: bool = False,
    threshold_add: float | None = None,
    max_patch_length: int | None = None,
    iterations: int = 40,
) -> float:
    """Bisection for θ over rows of entropies [T_i]: mean patch size = bytes / patches (BOS included).

    The number of patches only falls as θ rises, so bisection finds the target.
    """
    if target_mean_patch_bytes < 1:
        raise BltError(f"the target mean patch size must be >= 1 byte, got {target_mean_patch_bytes}")
    total = sum(len(e) for e in entropies)

    def mean_patch(theta: float) -> float:
        n = sum(
            int(
                limit_patch_length(entropy_starts(e[None], theta, threshold_add, monotonicity), max_patch_length)[
                    0, : len(e)
                ].sum()
            )
            for e in entropies
        )
        return total / n

    top = max(float(e.max()) for e in entropies) + 1.0
    lo, hi = (-top if monotonicity else min(float(e.min()) for e in entropies) - 1.0), top
    if mean_patch(hi) < target_mean_patch_bytes:
        return hi  # even the largest threshold cannot reach the target: patches are as long as they get
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if mean_patch(mid) < target_mean_patch_bytes:
            lo = mid
        else:
            hi = mid
    return hi
