"""Modality-aware saliency unlearning, in the spirit of MMUnlearner (Huo et al., 2025, "MMUnlearner:
Reformulating Multimodal Machine Unlearning in the Era of Multimodal Large Language Models", arXiv
2502.11051): unlearning updates only the parameters of one part of the model — the vision tower,
the projector or the language model, chosen by config — that are most salient to the forget data
and least to the retain data, so the rest of the model (and the other modality) is left untouched.

At the first step the saliency of every trainable parameter entry in the chosen part is
|∂NLL_f/∂w| / (|∂NLL_r/∂w| + ε) on that step's batches; the top `keep_ratio` entries are updated,
every other trainable parameter is frozen (its gradient is masked to zero and weight decay is off).
Loss: −w_f·NLL(forget) + w_r·NLL(retain) (gradient difference under the mask)."""

from dataclasses import dataclass

import torch

from offside.engine.losses import token_nll
from offside.errors import OffsideError
from offside.unlearn import Method, register

PARTS = {"vision": "model.visual.blocks.", "projector": "model.visual.merger.", "language": "model.language_model."}
EPSILON = 1e-8


def salient_masks(scores: dict[str, torch.Tensor], keep_ratio: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the top `keep_ratio` share of all entries by score."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = max(1, int(round(keep_ratio * flat.numel())))
    threshold = torch.topk(flat, keep).values.min()
    return {name: s >= threshold for name, s in scores.items()}


@register
@dataclass
class ModalitySaliency(Method):
    name = "mm_saliency"
    streams = ("forget", "retain")
    part: str = "language"
    keep_ratio: float = 0.05
    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def __post_init__(self):
        if self.part not in PARTS:
            raise OffsideError(f"mm_saliency.part: unknown {self.part!r} (valid: {', '.join(PARTS)})")
        if not 0 < self.keep_ratio <= 1:
            raise OffsideError(f"mm_saliency.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        self._masked = False

    def loss(self, model, batches):
        if not self._masked:
            self._mask(model, batches)
        nll_forget = token_nll(model, batches["forget"])
        nll_retain = token_nll(model, batches["retain"])
        loss = -self.forget_weight * nll_forget + self.retain_weight * nll_retain
        return loss, {"nll_forget": nll_forget.item(), "nll_retain": nll_retain.item()}

    def _mask(self, model, batches) -> None:
        raw = getattr(model, "module", model)  # saliency gradients bypass the DeepSpeed engine's hooks
        named = [(n.removeprefix("base_model.model."), p) for n, p in raw.named_parameters() if p.requires_grad]
        part = [(n, p) for n, p in named if PARTS[self.part] in n]
        if not part:
            raise OffsideError(f"mm_saliency.part={self.part!r} has no trainable parameters "
                               "(is it frozen? set model.freeze_vision: false to unlearn in the vision tower)")
        params = [p for _, p in part]
        nll_forget, nll_retain = token_nll(raw, batches["forget"]), token_nll(raw, batches["retain"])
        g_forget = torch.autograd.grad(nll_forget, params, retain_graph=True)
        g_retain = torch.autograd.grad(nll_retain, params)
        scores = {n: gf.abs() / (gr.abs() + EPSILON) for (n, _), gf, gr in zip(part, g_forget, g_retain)}
        masks = salient_masks(scores, self.keep_ratio)
        for name, param in named:
            mask = masks.get(name, torch.zeros((), dtype=torch.bool, device=param.device)).to(param.dtype)
            param.register_hook(lambda grad, m=mask: grad * m)
        _disable_weight_decay(model)
        self._masked = True


def _disable_weight_decay(model) -> None:
    optimizer = getattr(model, "optimizer", None)
    for group in getattr(optimizer, "param_groups", []):
        group["weight_decay"] = 0.0
