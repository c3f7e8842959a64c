"""KL-constrained gradient ascent (the OFFSIDE paper's KL baseline): optimizer steps alternate between
a forget step, loss = −NLL(forget), and a retain step, loss = NLL(retain) + λ·KL(p_ref ‖ p_θ) with
temperature T, the KL taken over the retain answer tokens only (the published code also counted
prompt and image positions). Both NLLs and the KL are means over the answer tokens of the step's
global batch, as every method's (offside/engine/losses.py), so the gradient does not depend on how
the tokens split across ranks. Reference: the frozen vanilla model. Published λ = 0.1, T = 1.

The phase is the optimizer step's parity (DeepSpeed's `global_steps`: every micro-batch of an
accumulated step takes the same branch, and a resumed run continues the alternation where it
stopped); called on a plain module, with no optimizer, each call is a step."""

from dataclasses import dataclass

from offside.engine.losses import answer_logits, kl_ref_to_theta, token_nll, token_nll_from_logits
from offside.unlearn import ReferenceMethod, register


@register
@dataclass
class KLMinimisation(ReferenceMethod):
    name = "kl"
    streams = ("forget", "retain")
    kl_weight: float = 0.1
    temperature: float = 1.0

    def __post_init__(self):
        self._calls = 0

    def loss(self, model, batches):
        step = getattr(model, "global_steps", self._calls)
        self._calls += 1
        if step % 2 == 0:
            nll_forget = token_nll(model, batches["forget"])
            return -nll_forget, {"nll_forget": nll_forget.item()}
        retain = batches["retain"]
        logits, targets = answer_logits(model, retain)
        ref_logits = self.reference_logits(retain)
        nll_retain = token_nll_from_logits(logits, targets, retain)
        kl = kl_ref_to_theta(logits, ref_logits, targets, self.temperature, retain)
        return nll_retain + self.kl_weight * kl, {"nll_retain": nll_retain.item(), "kl": kl.item()}
