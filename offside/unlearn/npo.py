"""Negative Preference Optimization (NPO; Zhang et al., 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning", arXiv 2404.05868):

    L = −(2/β) · mean_i log σ(β · (NLL_θ(y_i|x_i) − NLL_ref(y_i|x_i)))

with NLL the summed negative log-likelihood of the forget answer. Computed per sequence by default;
`granularity: batch` reproduces the published OFFSIDE code, which took the log-ratio of batch-mean
losses. Reference: the vanilla model, or (the published choice) a model fine-tuned on retain only —
make it with `offside finetune --split retain` and pass its directory as `reference`."""

from dataclasses import dataclass

import torch.nn.functional as F

from offside.engine.losses import sequence_nll
from offside.errors import OffsideError
from offside.unlearn import ReferenceMethod, register

GRANULARITIES = ("sequence", "batch")


def npo_loss(nll_theta, nll_ref, beta: float):
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_theta - nll_ref)).mean()


@register
@dataclass
class NPO(ReferenceMethod):
    name = "npo"
    streams = ("forget",)
    beta: float = 0.9
    granularity: str = "sequence"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise OffsideError(f"npo.granularity: unknown {self.granularity!r} (valid: {', '.join(GRANULARITIES)})")

    def loss(self, model, batches):
        forget = batches["forget"]
        nll_theta = sequence_nll(model, forget, reduce="sum")
        nll_ref = self.reference_nll(forget, reduce="sum")
        if self.granularity == "batch":
            nll_theta, nll_ref = nll_theta.mean(keepdim=True, dim=0), nll_ref.mean(keepdim=True, dim=0)
        return npo_loss(nll_theta, nll_ref, self.beta), {"nll_forget": nll_theta.mean().item()}
