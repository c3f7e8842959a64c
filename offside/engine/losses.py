"""Likelihood building blocks shared by every objective. Only answer tokens count (labels mask the
prompt, the image and padding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_logprobs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled tokens and their mask, both (batch, seq-1)."""
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


def sequence_nll(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL of each sequence's answer tokens, shape (batch,)."""
    logprobs, mask = answer_logprobs(model, inputs)
    return -logprobs.sum(-1) / mask.sum(-1).clamp(min=1)


def token_nll(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the usual fine-tuning loss)."""
    logprobs, mask = answer_logprobs(model, inputs)
    return -logprobs.sum() / mask.sum().clamp(min=1)
