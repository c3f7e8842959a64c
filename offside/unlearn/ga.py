"""Gradient ascent (GA): maximise the NLL of the forget answers, loss = −NLL(forget)."""

from dataclasses import dataclass

from offside.engine.losses import token_nll
from offside.unlearn import Method, register


@register
@dataclass
class GradientAscent(Method):
    name = "ga"
    streams = ("forget",)

    def loss(self, model, batches):
        nll_forget = token_nll(model, batches["forget"])
        return -nll_forget, {"nll_forget": nll_forget.item()}
