"""Per-example losses for language models, and a guard against the batch-wide token mean.

DP-SGD clips each example's gradient, so an example's loss must depend on that example alone.
Token-level losses reduced by the mean over *all* real tokens of the batch (what transformers
models compute when given ``labels=``) break that: example i's loss is sum_t l_it / N with N
the batch's token count, so its gradient, and the update once clipped, moves when another
example's length changes. Adding or removing one example then changes every other example's
contribution: the sensitivity is no longer C. The losses here average over each example's own
real tokens: l_i = sum_t m_it l_it / max(1, sum_t m_it), with m the tokens whose label is not
``ignore_index``; the batch loss is the mean (or sum) of the l_i, which matches
``loss_reduction="mean"`` (or ``"sum"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenMeanLoss(nn.Module):
    """Cross-entropy averaged over each example's real tokens (module docstring).

    Args:
        ignore_index: the label of tokens that do not count (padding), as in
            ``nn.CrossEntropyLoss``; an example with none left has loss 0.
        shift: predict token t + 1 from position t (causal language modelling, as
            transformers' ``*ForCausalLM`` do internally): logits[:, :-1] against
            labels[:, 1:].
        reduction: "mean" or "sum" over the examples, or "none" for the (B,) losses.

    Shapes: logits (B, T, V), labels (B, T) -> (B,) or a scalar.
    """

    def __init__(self, ignore_index: int = -100, shift: bool = False, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.ignore_index, self.shift, self.reduction = ignore_index, shift, reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                "TokenMeanLoss takes logits (B, T, V) and labels (B, T), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=self.ignore_index, reduction="none"
        )  # (B, T), 0 at ignored tokens
        real = (labels != self.ignore_index).sum(dim=1).clamp_min(1)
        losses = tokens.sum(dim=1) / real.to(tokens.dtype)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


class CausalLMLoss(TokenMeanLoss):
    """:class:`TokenMeanLoss` with ``shift=True``: next-token prediction, labels = input ids
    (padding set to ``ignore_index``), as for transformers' causal LMs."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(ignore_index=ignore_index, shift=True, reduction=reduction)


def refuse_token_labels(model: nn.Module):
    """Forward pre-hook on a transformers (or peft) model: refuses ``labels=`` holding token
    ids (integer, 2-D or more) while gradients are on, since the model would reduce its loss
    over all tokens of the batch (module docstring). Per-example labels (B,) (sequence
    classification) are left alone. Returns the hook handle, or None for other models."""
    if not type(model).__module__.startswith(("transformers.", "peft.")):
        return None

    def hook(module, args, kwargs):
        labels = kwargs.get("labels")
        if (
            torch.is_grad_enabled()
            and isinstance(labels, Tensor)
            and labels.dim() >= 2
            and not labels.is_floating_point()
        ):
            raise ValueError(
                "torch_dpfast: the model was given labels= of token ids: transformers averages "
                "its loss over every token of the batch, so each example's gradient depends on "
                "the other examples' lengths and per-example clipping no longer bounds one "
                "example's influence by C. Call the model without labels and compute the loss "
                "from its logits per example: torch_dpfast.CausalLMLoss()(outputs.logits, "
                "labels) for causal LMs, torch_dpfast.TokenMeanLoss() for masked-LM and token "
                "classification (docs/language_models.md)"
            )

    return model.register_forward_pre_hook(hook, with_kwargs=True)
