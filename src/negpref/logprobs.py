"""Model forward -> per-sequence summed log-probs of the answer tokens.

The one place that turns logits into the 1-D tensors every loss in ``negpref.losses`` takes.
Token log-probs are ``logit[target] - logsumexp(logits)`` in float32, which avoids
materialising a full log-softmax copy of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # [batch] sum of answer-token log-probs
    n_tokens: torch.Tensor  # [batch] number of answer tokens
    token_logps: torch.Tensor  # [batch, tokens-1] per-token log-probs (0 off the answer)
    mask: torch.Tensor  # [batch, tokens-1] answer mask aligned with token_logps / logits
    targets: torch.Tensor  # [batch, tokens-1] the token each position predicts (input_ids[:, 1:])
    logits: torch.Tensor | None = None  # [batch, tokens-1, vocab] with keep_logits
    # [batch, tokens, vocab], unshifted (``logits`` is a view of it); with keep_logits
    all_logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # [batch, tokens] of the batch
    # [batch, tokens, hidden] activations after decoder block ``hidden_layer`` (unshifted)
    hidden: torch.Tensor | None = None


def token_logps_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted next-token log-probs and mask: position t scores token t+1."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:]
    mask = answer_mask[:, 1:].to(logits.dtype)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - logits.logsumexp(-1)) * mask
    return token_logps, mask


def sequence_logps(
    model,
    batch: dict[str, torch.Tensor],
    keep_logits: bool = False,
    hidden_layer: int | None = None,
) -> SequenceLogps:
    """One forward of ``batch`` (from ``data.collate``) through ``model``; with ``hidden_layer``
    N also the output of decoder block N (0-based, ``model.layers.N``)."""
    hidden_kwargs = {"output_hidden_states": True} if hidden_layer is not None else {}
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **hidden_kwargs
    )
    token_logps, mask = token_logps_from_logits(
        out.logits, batch["input_ids"], batch["answer_mask"]
    )
    return SequenceLogps(
        logps=token_logps.sum(-1),
        n_tokens=mask.sum(-1),
        token_logps=token_logps,
        mask=mask,
        targets=batch["input_ids"][:, 1:],
        logits=out.logits[:, :-1] if keep_logits else None,
        all_logits=out.logits if keep_logits else None,
        attention_mask=batch["attention_mask"],
        # hidden_states[0] is the embedding output, [N + 1] the output of block N
        hidden=out.hidden_states[hidden_layer + 1] if hidden_layer is not None else None,
    )
