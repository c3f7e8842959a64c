"""Preference optimisation toward a refusal (PO / IdK; Maini et al., 2024, "TOFU: A Task of
Fictitious Unlearning for LLMs", arXiv 2401.06121): loss = NLL(refusal | forget question) +
w_r·NLL(retain). The refusal is configurable; published "I do not know the answer"."""

from dataclasses import dataclass

from offside.engine.losses import token_nll
from offside.unlearn import Method, register, with_answer

REFUSAL = "I do not know the answer."


@register
@dataclass
class RefusalPO(Method):
    name = "po"
    streams = ("forget", "retain")
    refusal: str = REFUSAL
    retain_weight: float = 1.0

    def rewrites(self):
        return {"forget_refusal": ("forget", with_answer(self.refusal))}

    def loss(self, model, batches):
        nll_refusal = token_nll(model, batches["forget_refusal"])
        nll_retain = token_nll(model, batches["retain"])
        loss = nll_refusal + self.retain_weight * nll_retain
        return loss, {"nll_refusal": nll_refusal.item(), "nll_retain": nll_retain.item()}
