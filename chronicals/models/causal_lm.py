"""Patched causal-LM forward for the `linear_cross_entropy` flag.

In training with labels the loss comes straight from the final hidden states and the lm_head weight
(`fused_linear_cross_entropy`), so the [tokens, vocab] logits are never materialised and the output
carries no logits. Otherwise (evaluation, generation, no labels) HF's own forward runs and returns its
logits and loss unchanged.

The loss is HF's `ForCausalLMLoss`: targets are the labels shifted left by one (labels[..., 1:], the
last position ignored) unless `shift_labels` is given; the mean is over valid targets, or
sum / `num_items_in_batch` when that is given (the valid-token count across gradient accumulation).
Tied embeddings need nothing special: the head weight is read at call time, and it is the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .dispatch import kernels_usable
from .projections import plain_linear


def shift_left(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """targets[..., t] = labels[..., t + 1]; the last position has no next token and is ignored."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def linear_cross_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, *,
                              ignore_index: int = -100, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T + bias) against aligned `targets`, HF's reduction."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if kernels_usable(hidden):
        from chronicals.kernels import fused_linear_cross_entropy

        # No host-side label check (a GPU synchronisation per step): a label outside the vocabulary makes the loss
        # NaN instead, and ChronicalsTrainer refuses such token ids with a clear error before training.
        return fused_linear_cross_entropy(hidden, weight, targets, bias, ignore_index=ignore_index,
                                          reduction="mean", normalizer=num_items_in_batch, check_labels=False)
    logits = F.linear(hidden, weight, bias).float()
    if num_items_in_batch is None:
        # Summed over valid targets, divided by their count clamped to 1: an all-ignored batch gives 0 as the fused
        # kernel does (a plain mean would be 0/0 = NaN).
        num_items_in_batch = (targets != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


@can_return_tuple
def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    # A LoRA-wrapped, hooked or otherwise replaced lm_head (PEFT, a user's hook, DeepSpeed ZeRO-3 or accelerate
    # offloading) has a forward of its own that the fused loss, reading lm_head.weight directly, would skip.
    if labels is None or not self.training or not plain_linear(self.lm_head):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    ignore_index = kwargs.get("ignore_index", -100)
    targets = kwargs.get("shift_labels")
    if targets is None:
        targets = shift_left(labels, ignore_index)
    loss = linear_cross_entropy_loss(outputs.last_hidden_state, self.lm_head.weight, self.lm_head.bias, targets,
                                     ignore_index=ignore_index, num_items_in_batch=kwargs.get("num_items_in_batch"))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)
