"""Likelihood building blocks shared by every objective. Only answer tokens count (labels mask the
prompt, the image and padding), and only the positions that predict them are projected onto the
vocabulary. Functions of logits are separate from model calls so that losses can be checked on
hand-made logits (aligned: logits[:, i] predicts targets[:, i]).

Token means are means over the optimizer step's global batch: the trainer stores in each batch
(`ANSWER_TOKENS`, and `INPUT_TOKENS` for losses over every token the model reads) the tokens of the
whole step, all ranks and accumulated micro-batches together, divided by ranks × micro-batches. A
rank's sum over its tokens divided by that, averaged over ranks (the all-reduce) and micro-batches
(DeepSpeed's accumulation), is the mean over every token of the step, whatever the number of
workers. Without it (a plain call), the batch's own count. Every token mean divides by
`step_tokens`; a mean over a rank's own tokens would weigh tokens by how they split across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ANSWER_TOKENS = "answer_tokens"  # batch key: the step's mean answer tokens per micro-batch and rank
INPUT_TOKENS = "input_tokens"  # batch key: the same for the tokens the model reads (not padding)
# What each count counts in one encoded batch: the positions that predict an answer token, the real tokens.
TOKEN_COUNTS = {ANSWER_TOKENS: lambda batch: (batch["labels"][:, 1:] != -100).sum(),
                INPUT_TOKENS: lambda batch: batch["attention_mask"].sum()}


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model takes: the batch without its labels and token counts."""
    return {k: v for k, v in inputs.items() if k != "labels" and k not in TOKEN_COUNTS}


def step_tokens(inputs: dict[str, torch.Tensor], key: str, mask: torch.Tensor) -> torch.Tensor:
    """The denominator of a token mean: the step's count the trainer stored under `key`, or (a plain
    call) the batch's own, `mask.sum()` (module docstring)."""
    return inputs.get(key, mask.sum()).clamp(min=1)


def answer_logits(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions that predict an answer token in some row of the batch:
    logits (batch, positions, vocab), targets (batch, positions), -100 where a row has no answer token
    there. The model projects only those positions onto the vocabulary (`logits_to_keep`): at Qwen's
    151,936 tokens, logits over every image and prompt position would be most of a step's memory."""
    labels = inputs["labels"]
    positions = (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)
    logits = model(**model_inputs(inputs), logits_to_keep=positions).logits
    return logits, labels[:, positions + 1]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the targets (-100: none) under the logits at the same position, and the mask."""
    mask = targets != -100
    logprobs = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Per-sequence answer NLL, shape (batch,): summed over answer tokens, or their mean."""
    logprobs, mask = token_logprobs(logits, targets)
    total = -logprobs.sum(-1)
    return total if reduce == "sum" else total / mask.sum(-1).clamp(min=1)


def answer_logprobs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return token_logprobs(*answer_logits(model, inputs))


def sequence_nll(model, inputs: dict[str, torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """NLL of each sequence's answer, shape (batch,): mean over its tokens, or (reduce="sum") the
    negative log-likelihood of the whole answer."""
    return nll_from_logits(*answer_logits(model, inputs), reduce)


def token_nll(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the usual fine-tuning loss); in training, over
    the step's global batch (module docstring)."""
    return token_nll_from_logits(*answer_logits(model, inputs), inputs)


def token_nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`token_nll` of logits already computed (aligned with `targets`) for the batch `inputs`."""
    logprobs, mask = token_logprobs(logits, targets)
    return -logprobs.sum() / step_tokens(inputs, ANSWER_TOKENS, mask)


def kl_ref_to_theta(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) of the next-token distributions, the mean over answer positions: in training,
    over the step's global batch of `inputs` (as `token_nll`), else over these positions."""
    mask = targets != -100
    log_theta = F.log_softmax(logits.float() / temperature, dim=-1)
    log_ref = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    per_position = (log_ref.exp() * (log_ref - log_theta)).sum(-1)
    return (per_position * mask).sum() / step_tokens(inputs or {}, ANSWER_TOKENS, mask)


def hidden_states_at(model, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The language model's hidden states after `layer` (0 = embeddings), (batch, seq, hidden)."""
    return model(**model_inputs(inputs), output_hidden_states=True).hidden_states[layer]
