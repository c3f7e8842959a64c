"""Gradient difference (GD): ascend on forget, descend on retain,
loss = w_f·(−NLL(forget)) + w_r·NLL(retain), published weights 0.25 / 0.75."""

from dataclasses import dataclass

from offside.engine.losses import token_nll
from offside.unlearn import Method, register


@register
@dataclass
class GradientDifference(Method):
    name = "gd"
    streams = ("forget", "retain")
    forget_weight: float = 0.25
    retain_weight: float = 0.75

    def loss(self, model, batches):
        nll_forget = token_nll(model, batches["forget"])
        nll_retain = token_nll(model, batches["retain"])
        loss = -self.forget_weight * nll_forget + self.retain_weight * nll_retain
        return loss, {"nll_forget": nll_forget.item(), "nll_retain": nll_retain.item()}
