"""Seeded text perturbations in the style of the paper's noised HellaSwag (§6.1): random case flips,
character deletions, character repeats, and letters spaced out (the paper's "AntSpeak"). Each is a
pure function of (text, rate, seed), so a report can be reproduced exactly."""

from __future__ import annotations

import random

from blt.errors import BltError


def random_case(text: str, rate: float, rng: random.Random) -> str:
    return "".join(c.swapcase() if c.isalpha() and rng.random() < rate else c for c in text)


def drop_chars(text: str, rate: float, rng: random.Random) -> str:
    return "".join(c for c in text if c.isspace() or rng.random() >= rate)


def repeat_chars(text: str, rate: float, rng: random.Random) -> str:
    return "".join(c * (2 if not c.isspace() and rng.random() < rate else 1) for c in text)


def spaced_letters(text: str, rate: float, rng: random.Random) -> str:
    """Spell a share `rate` of the words out letter by letter, upper case: "cat" -> "C A T"."""
    words = text.split(" ")
    return " ".join(" ".join(w.upper()) if w.isalpha() and rng.random() < rate else w for w in words)


PERTURBATIONS = {"random_case": random_case, "drop": drop_chars, "repeat": repeat_chars, "spaced": spaced_letters}
DEFAULT_RATES = {"random_case": 0.2, "drop": 0.05, "repeat": 0.05, "spaced": 0.2}


def perturb(text: str, kind: str, rate: float | None = None, seed: int = 0) -> str:
    """`text` under perturbation `kind` (one of PERTURBATIONS), deterministic for a given seed."""
    if kind not in PERTURBATIONS:
        raise BltError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")
    rate = DEFAULT_RATES[kind] if rate is None else rate
    if not 0 <= rate <= 1:
        raise BltError(f"perturbation rate must be in [0, 1], got {rate}")
    return PERTURBATIONS[kind](text, rate, random.Random(f"{kind}:{seed}"))
