"""The classes users hold: the network, plus `generate` / `stream` and `save_pretrained`.

`blt.model.BLT` is the network alone, and the model layer imports nothing above itself. Generation lives in
`blt.inference` and the file formats in `blt.weights`, both above it, so a class defined at the model's level
could not offer those methods without an upward import. Of the two ways out, mixins below the model (as
transformers' `GenerationMixin`) would need the whole cached engine below the model as well; so instead the
loaders return these subclasses, defined here, the lowest layer that sees both the engine and the formats.
`blt.BLT` and `blt.EntropyModel` are these classes.
"""

from __future__ import annotations

import os

from blt.inference.generate import GenerationMixin
from blt.model import blt as network
from blt.model import entropy_model
from blt.weights.ours import save_blt, save_entropy_model


class BLT(GenerationMixin, network.BLT):
    """A BLT you can generate with (`generate`, `stream`) and save (`save_pretrained`)."""

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write `config.json` + `model.safetensors` (+ `entropy_model/`, + `bpe_tokenizer.json`); `state_dict`
        replaces the model's own weights (as in transformers: a sharded model's weights, gathered whole)."""
        save_blt(self, path, state_dict)


class EntropyModel(entropy_model.EntropyModel):
    """An entropy model you can save (`save_pretrained`)."""

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write `config.json` + `model.safetensors`; `state_dict` replaces the model's own weights."""
        save_entropy_model(self, path, state_dict)
