"""IdK-DPO: Direct Preference Optimization (Rafailov et al., 2023, arXiv 2305.18290) with the refusal
preferred over the forget answer, as in the "IdkDPO" baseline of Zhang et al., 2024 (NPO, arXiv
2404.05868) and TOFU:

    L = −mean log σ(β·[(log π_θ − log π_ref)(refusal) − (log π_θ − log π_ref)(answer)]) + w_r·NLL(retain)

with log π the summed log-likelihood of a whole answer. Reference: the frozen vanilla model."""

from dataclasses import dataclass

import torch.nn.functional as F

from offside.engine.losses import sequence_nll, token_nll
from offside.unlearn import ReferenceMethod, register, with_answer
from offside.unlearn.po import REFUSAL


def dpo_loss(nll_chosen, nll_rejected, ref_nll_chosen, ref_nll_rejected, beta: float):
    """All arguments are summed NLLs (−log π) per sequence."""
    chosen = ref_nll_chosen - nll_chosen  # log π_θ − log π_ref of the preferred answer
    rejected = ref_nll_rejected - nll_rejected
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


@register
@dataclass
class IdkDPO(ReferenceMethod):
    name = "idk_dpo"
    streams = ("forget", "retain")
    beta: float = 0.1
    refusal: str = REFUSAL
    retain_weight: float = 1.0

    def rewrites(self):
        return {"forget_refusal": ("forget", with_answer(self.refusal))}

    def loss(self, model, batches):
        chosen, rejected = batches["forget_refusal"], batches["forget"]
        pref = dpo_loss(
            sequence_nll(model, chosen, reduce="sum"), sequence_nll(model, rejected, reduce="sum"),
            self.reference_nll(chosen, reduce="sum"), self.reference_nll(rejected, reduce="sum"), self.beta,
        )
        nll_retain = token_nll(model, batches["retain"])
        return pref + self.retain_weight * nll_retain, {"dpo": pref.item(), "nll_retain": nll_retain.item()}
