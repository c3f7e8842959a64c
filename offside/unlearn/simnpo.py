"""SimNPO (Fan et al., 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning", arXiv 2410.07163): reference-free, length-normalised NPO with a margin γ,

    L = −(2/β) · mean_i log σ(−(β/|y_i|)·log π_θ(y_i|x_i) − γ) + w_r·NLL(retain)
      = −(2/β) · mean_i log σ(β·NLL_θ(y_i|x_i)/|y_i| − γ) + w_r·NLL(retain).

Defaults: the paper's β = 2.5, γ = 0; retain weight 1."""

from dataclasses import dataclass

import torch.nn.functional as F

from offside.engine.losses import sequence_nll, token_nll
from offside.unlearn import Method, register


def simnpo_loss(mean_nll, beta: float, gamma: float):
    return -(2.0 / beta) * F.logsigmoid(beta * mean_nll - gamma).mean()


@register
@dataclass
class SimNPO(Method):
    name = "simnpo"
    streams = ("forget", "retain")
    beta: float = 2.5
    gamma: float = 0.0
    retain_weight: float = 1.0

    def loss(self, model, batches):
        mean_nll = sequence_nll(model, batches["forget"], reduce="mean")
        forget = simnpo_loss(mean_nll, self.beta, self.gamma)
        nll_retain = token_nll(model, batches["retain"])
        return forget + self.retain_weight * nll_retain, {"simnpo": forget.item(), "nll_retain": nll_retain.item()}
