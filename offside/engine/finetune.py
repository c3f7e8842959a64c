"""Plain fine-tuning objective (vanilla model, retain-only reference, corrective relearning)."""

from offside.engine.losses import token_nll
from offside.engine.trainer import Objective


class FineTune(Objective):
    streams = ("train",)

    def loss(self, model, batches):
        return token_nll(model, batches["train"]), {}
