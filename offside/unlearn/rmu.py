"""Representation Misdirection for Unlearning (RMU; Li et al., 2024, "The WMDP Benchmark: Measuring and
Reducing Malicious Use with Unlearning", arXiv 2403.03218). At one language-model layer ℓ:

    L = mean_forget ‖h_θ(x) − c·u‖² + α · mean_retain ‖h_θ(x) − h_ref(x)‖²

over the non-padding tokens (means over the step's global batch, as every method's token means:
offside/engine/losses.py), u a fixed random unit vector (seeded), c the steering coefficient,
h_ref the frozen vanilla model. Defaults: the paper's c = 6.5, α = 1200; layer −1 means the middle
layer. The paper updates only layers up to ℓ; here what is trained is the model config (LoRA groups or
full), like every method."""

from dataclasses import dataclass

import torch

from offside.engine.losses import INPUT_TOKENS, hidden_states_at, step_tokens
from offside.unlearn import ReferenceMethod, register


def masked_sq_distance(hidden, target, inputs):
    """Mean over the real tokens of `inputs` (the step's, in training) of ‖hidden − target‖² (target broadcasts)."""
    mask = inputs["attention_mask"]
    per_token = ((hidden - target) ** 2).sum(-1)
    return (per_token * mask).sum() / step_tokens(inputs, INPUT_TOKENS, mask)


@register
@dataclass
class RMU(ReferenceMethod):
    name = "rmu"
    streams = ("forget", "retain")
    layer: int = -1
    steering: float = 6.5
    alpha: float = 1200.0
    seed: int = 0

    def setup(self, model, device):
        super().setup(model, device)
        layers = model.config.text_config.num_hidden_layers
        self._layer = layers // 2 if self.layer < 0 else self.layer
        generator = torch.Generator().manual_seed(self.seed)
        direction = torch.rand(model.config.text_config.hidden_size, generator=generator)
        self._control = (self.steering * direction / direction.norm()).to(device)

    def loss(self, model, batches):
        forget, retain = batches["forget"], batches["retain"]
        h_forget = hidden_states_at(model, forget, self._layer)
        h_retain = hidden_states_at(model, retain, self._layer)
        with torch.no_grad():
            h_ref = hidden_states_at(self.reference_model, retain, self._layer)
        forget_loss = masked_sq_distance(h_forget, self._control.to(h_forget.dtype), forget)
        retain_loss = masked_sq_distance(h_retain, h_ref, retain)
        return forget_loss + self.alpha * retain_loss, {"rmu_forget": forget_loss.item(), "rmu_retain": retain_loss.item()}
