"""Modality-aware saliency unlearning, in the spirit of MMUnlearner (Huo et al., 2025, "MMUnlearner:
Reformulating Multimodal Machine Unlearning in the Era of Multimodal Large Language Models", arXiv
2502.11051): unlearning updates only the parameters of one part of the model — the vision tower,
the projector or the language model, chosen by config — that are most salient to the forget data
and least to the retain data, so the rest of the model (and the other modality) is left untouched.

At the first step the saliency of every trainable parameter entry in the chosen part is
|∂NLL_f/∂w| / (|∂NLL_r/∂w| + ε) on that step's batches — the gradients averaged over the ranks, so
every rank chooses the same entries, those of the global batch; the top `keep_ratio` entries are
updated, every other trainable parameter is frozen (its gradient is masked to zero and weight decay
is off). The mask is saved with each checkpoint, and a resumed run keeps it.
Loss: −w_f·NLL(forget) + w_r·NLL(retain) (gradient difference under the mask)."""

from dataclasses import dataclass

import torch

from offside.engine import comm
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
        self._masks: dict[str, torch.Tensor] | None = None  # name → bool mask, once chosen
        self._hooked = False

    def loss(self, model, batches):
        if not self._hooked:
            raw = getattr(model, "module", model)  # saliency gradients bypass the DeepSpeed engine's hooks
            named = [(n.removeprefix("base_model.model."), p) for n, p in raw.named_parameters() if p.requires_grad]
            if self._masks is None:
                self._masks = self._choose(raw, named, batches)
            self._apply(named, self._masks)
            _disable_weight_decay(model)
        nll_forget = token_nll(model, batches["forget"])
        nll_retain = token_nll(model, batches["retain"])
        loss = -self.forget_weight * nll_forget + self.retain_weight * nll_retain
        return loss, {"nll_forget": nll_forget.item(), "nll_retain": nll_retain.item()}

    def state_dict(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self._masks.items()}} if self._masks is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._masks = state.get("masks")

    def _choose(self, raw, named, batches) -> dict[str, torch.Tensor]:
        part = [(n, p) for n, p in named if PARTS[self.part] in n]
        if not part:
            raise OffsideError(f"mm_saliency.part={self.part!r} has no trainable parameters "
                               "(is it frozen? set model.freeze_vision: false to unlearn in the vision tower)")
        params = [p for _, p in part]
        nll_forget, nll_retain = token_nll(raw, batches["forget"]), token_nll(raw, batches["retain"])
        g_forget = _rank_mean(torch.autograd.grad(nll_forget, params, retain_graph=True))
        g_retain = _rank_mean(torch.autograd.grad(nll_retain, params))
        scores = {n: gf.abs() / (gr.abs() + EPSILON) for (n, _), gf, gr in zip(part, g_forget, g_retain)}
        return salient_masks(scores, self.keep_ratio)

    def _apply(self, named, masks: dict[str, torch.Tensor]) -> None:
        for name, param in named:
            mask = masks[name].to(param.device, param.dtype) if name in masks else torch.zeros((), dtype=param.dtype, device=param.device)
            param.register_hook(lambda grad, m=mask: grad * m)
        self._hooked = True


def _rank_mean(grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Gradients averaged over the process group's ranks (as the optimizer step averages them)."""
    return [comm.all_reduce_mean(grad.detach()) for grad in grads]


def _disable_weight_decay(model) -> None:
    optimizer = getattr(model, "optimizer", None)
    for group in getattr(optimizer, "param_groups", []):
        group["weight_decay"] = 0.0
