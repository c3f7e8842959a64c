"""Likelihood building blocks shared by every objective. Only answer tokens count (labels mask the
prompt, the image and padding). Functions of logits are separate from model calls so that losses
can be checked on hand-made logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled next tokens and their mask, both (batch, seq-1)."""
    targets = labels[:, 1:]
    mask = targets != -100
    logprobs = torch.gather(F.log_softmax(logits[:, :-1].float(), dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Per-sequence answer NLL, shape (batch,): summed over answer tokens, or their mean."""
    logprobs, mask = token_logprobs(logits, labels)
    total = -logprobs.sum(-1)
    return total if reduce == "sum" else total / mask.sum(-1).clamp(min=1)


def answer_logprobs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return token_logprobs(logits_of(model, inputs), inputs["labels"])


def sequence_nll(model, inputs: dict[str, torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """NLL of each sequence's answer, shape (batch,): mean over its tokens, or (reduce="sum") the
    negative log-likelihood of the whole answer."""
    return nll_from_logits(logits_of(model, inputs), inputs["labels"], reduce)


def token_nll(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the usual fine-tuning loss)."""
    logprobs, mask = answer_logprobs(model, inputs)
    return -logprobs.sum() / mask.sum().clamp(min=1)


def kl_ref_to_theta(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) of the next-token distributions, averaged over answer positions only."""
    mask = (labels[:, 1:] != -100).float()
    log_theta = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    log_ref = F.log_softmax(ref_logits[:, :-1].float() / temperature, dim=-1)
    per_position = (log_ref.exp() * (log_ref - log_theta)).sum(-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def hidden_states_at(model, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The language model's hidden states after `layer` (0 = embeddings), (batch, seq, hidden)."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    return model(**model_inputs, output_hidden_states=True).hidden_states[layer]
