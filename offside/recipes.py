"""Training recipes: the published hyperparameters (real Qwen2.5-VL checkpoints with LoRA) and the
tiny model's (a from-scratch 1.7M-parameter model needs far larger steps, and a few of them).

The tiny numbers were chosen on the quickstart benchmark (12 players): the vanilla recipe reaches
≥ 0.9 multiple-choice accuracy on forget/retain and ≥ 0.6 on new photos; unlearning recipes are 8
optimizer steps, inside the narrow window where forgetting shows before everything collapses
(notes/tiny-model.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from offside.engine.spec import TrainSpec
from offside.errors import OffsideError

PUBLISHED_UNLEARN = TrainSpec(epochs=3, lr=5e-5, batch_size=4, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01)
PUBLISHED_RELEARN = TrainSpec(epochs=6, lr=1e-4, batch_size=8, warmup_ratio=0.05, schedule="cosine")

# No augmentation: the generator already shows each player in a new pose, position, scale and
# background on every photo, and extra random views only slowed fitting (measured on the quickstart
# benchmark: forget/retain/test 0.97/0.99/0.78 without, 0.88/0.86/0.73 with).
TINY_VANILLA = TrainSpec(epochs=40, lr=3e-3, batch_size=32, warmup_ratio=0.05, schedule="cosine", weight_decay=0.0)
# 1e-3: on the vanilla model that reads kits (the kit drill), 4e-4 left GA and GD forget accuracy at 0.89
# and 0.98; 1e-3 takes it to 0.56 and 0.87 (quickstart benchmark, seed 0; docs/results.md).
TINY_UNLEARN = TrainSpec(epochs=1, lr=1e-3, batch_size=16, warmup_ratio=0.0, schedule="constant", weight_decay=0.0)
# Relearning at 3e-4 learns the true facts (relearn accuracy ≈0.42 → 0.72–0.90) without the collateral
# loss 1e-3 caused (retain 0.87 → 0.71 for GD, the relearn set being all the model sees for 250 steps).
TINY_RELEARN = replace(PUBLISHED_RELEARN, lr=3e-4)
# Method hyperparameters whose published scale assumes a 7B model's activations.
TINY_METHOD_ARGS = {"rmu": {"steering": 20.0, "alpha": 1.0}, "mm_saliency": {"keep_ratio": 0.2}}
# Learning rates that bring every method to a comparable depth of forgetting in its 8 steps: the
# methods with a retain term, a bounded loss, a refusal target or a parameter mask move the forget
# answers several times more slowly than plain gradient ascent (measured on the quickstart benchmark).
TINY_METHOD_TRAIN = {
    "ga": {"lr": 1e-3}, "npo": {"lr": 1e-3},
    "gd": {"lr": 3e-3}, "kl": {"lr": 3e-3}, "simnpo": {"lr": 3e-3},
    "po": {"lr": 8e-3}, "idk_dpo": {"lr": 8e-3}, "rmu": {"lr": 8e-3}, "mm_saliency": {"lr": 8e-3},
}

RECIPES = {
    "published": {"train": PUBLISHED_UNLEARN, "relearn": PUBLISHED_RELEARN, "method_args": {}, "method_train": {}},
    "tiny": {"train": TINY_UNLEARN, "relearn": TINY_RELEARN, "method_args": TINY_METHOD_ARGS, "method_train": TINY_METHOD_TRAIN},
}


# The tiny vanilla model learns each question in 3 wordings (offside/data/phrasings.py) for a third of
# the epochs, at the same cost: measured on the quickstart benchmark, forget/retain/test 0.94/0.99/0.71
# against 0.98/0.99/0.73 with the canonical wording alone (within the spread of a seed), and a rewording
# attack then tests what the model learned, not whether it has ever seen another wording.
TINY_PHRASINGS = 3
# The kit drill (`kit_drill`, offside/data/kits.py): the kit knowledge a pre-trained model brings,
# without which the tiny model remembers photos and does not read kits (the visual-reading suite's kit
# following). Its vision tower is pre-trained to tell kits and looks apart and frozen, and the fine-tune
# sees TINY_KIT_DRILL photos per club of anonymous players asked the club question. Measured on the
# quickstart benchmark (seed 0, docs/results.md): kit following 1.00 and forget/retain/test 1.00/1.00/0.98
# with both; 0.52 without the drill rows; 0.50 with a tower pre-trained on kits alone and left to train.
TINY_KIT_DRILL = 50


def tiny_vanilla(phrasings: int = TINY_PHRASINGS, seed: int = 0) -> TrainSpec:
    """TINY_VANILLA for a fine-tune whose questions come in `phrasings` wordings (each epoch that many
    times longer): its epochs divided by them, so the optimizer takes about as many steps."""
    return replace(TINY_VANILLA, epochs=math.ceil(TINY_VANILLA.epochs / phrasings), seed=seed)


def recipe_config(name: str) -> dict:
    """A recipe as config keys (train, relearn, method_args, method_train), to merge under a user's config."""
    if name not in RECIPES:
        raise OffsideError(f"unknown recipe {name!r} (valid: {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    return {"train": asdict(recipe["train"]), "relearn": asdict(recipe["relearn"]),
            "method_args": recipe["method_args"], "method_train": recipe["method_train"]}
