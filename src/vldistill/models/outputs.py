"""What every dual encoder (teacher or student) returns: the contract the losses and the loop meet."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vldistill.distributed import all_gather_rows, gathering


# What a loss may need from the teacher. An empty set means a task loss (no teacher at all).
TEACHER_EMBEDDINGS = "embeddings"
TEACHER_HIDDEN_STATES = "hidden_states"
TEACHER_ATTENTIONS = "attentions"


@dataclass
class DualEncoderOutput:
    """Outputs of one dual-encoder forward pass over a batch of paired images and texts.

    image_embeds / text_embeds: (B, D), L2-normalized.
    logit_scale: scalar tensor, already exponentiated (multiply cosine similarities by it).
    *_hidden_states: per-layer hidden states, (embeddings, layer 1, ..., layer L), each (B, N, W),
        present only when requested.
    *_attentions: per-layer attention probabilities, each (B, heads, N, N), present only when requested.
    text_attention_mask: (B, N_text) 1 for real tokens, so text-token losses can ignore padding.
    image_to_text_logits / text_to_image_logits: set by a teacher ensemble whose combined logits are
        not the scaled product of its embeddings (see models/ensemble.py); None for a single model.
    logit_bias: SigLIP's learned bias (a constant shift of every logit; softmax-based losses ignore it).
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    image_hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    text_hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    image_attentions: Optional[tuple[torch.Tensor, ...]] = None
    text_attentions: Optional[tuple[torch.Tensor, ...]] = None
    text_attention_mask: Optional[torch.Tensor] = None
    image_to_text_logits: Optional[torch.Tensor] = None
    text_to_image_logits: Optional[torch.Tensor] = None
    logit_bias: Optional[torch.Tensor] = None

    def logits_per_image(self) -> torch.Tensor:
        """(B, B) image->text logits: row i scores every text for image i."""
        if self.image_to_text_logits is not None:
            return self.image_to_text_logits
        return self.logit_scale * self.image_embeds @ self.text_embeds.t()

    def logits_per_text(self) -> torch.Tensor:
        """(B, B) text->image logits: row j scores every image for text j."""
        if self.text_to_image_logits is not None:
            return self.text_to_image_logits
        return self.logits_per_image().t()

    @classmethod
    def from_towers(
        cls,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        vision,
        text,
        text_attention_mask: Optional[torch.Tensor],
        hidden_states: bool,
        attentions: bool,
        **extra,
    ) -> "DualEncoderOutput":
        """An output from the two towers' HF outputs, keeping hidden states and attention maps only
        when they were requested."""
        return cls(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            image_hidden_states=vision.hidden_states if hidden_states else None,
            text_hidden_states=text.hidden_states if hidden_states else None,
            image_attentions=vision.attentions if attentions else None,
            text_attentions=text.attentions if attentions else None,
            text_attention_mask=text_attention_mask,
            **extra,
        )


def concat_outputs(outputs: Sequence[DualEncoderOutput]) -> DualEncoderOutput:
    """Several micro-batches' outputs of one model as the output of one batch, rows in the given order
    (gradient accumulation): embeddings, hidden states, attention maps and text masks concatenated along
    the batch, text tokens zero-padded to the longest (mask 0 there); scale and bias are the first's."""
    if len(outputs) == 1:
        return outputs[0]
    if any(output.image_to_text_logits is not None for output in outputs):
        raise ValueError("concatenate each teacher's own outputs before combining them into an ensemble")
    first = outputs[0]
    return replace(
        first,
        image_embeds=torch.cat([o.image_embeds for o in outputs]),
        text_embeds=torch.cat([o.text_embeds for o in outputs]),
        image_hidden_states=_cat_layers([o.image_hidden_states for o in outputs], token_dims=()),
        text_hidden_states=_cat_layers([o.text_hidden_states for o in outputs], token_dims=(1,)),
        image_attentions=_cat_layers([o.image_attentions for o in outputs], token_dims=()),
        text_attentions=_cat_layers([o.text_attentions for o in outputs], token_dims=(2, 3)),
        text_attention_mask=(
            None if first.text_attention_mask is None
            else _cat_padded([o.text_attention_mask for o in outputs], token_dims=(1,))
        ),
    )


def gather_embeddings(output: DualEncoderOutput, keep_grad: bool) -> DualEncoderOutput:
    """The output with image and text embeddings of the global batch (hidden states and attention maps
    stay local: the layer-wise losses are per-sample means, which DDP's averaging makes global)."""
    if not gathering():
        return output
    if output.image_to_text_logits is not None:
        raise ValueError("gather the teachers' outputs before combining them into an ensemble")
    return replace(
        output,
        image_embeds=all_gather_rows(output.image_embeds, keep_grad),
        text_embeds=all_gather_rows(output.text_embeds, keep_grad),
    )


def _cat_layers(per_output: list[Optional[tuple[torch.Tensor, ...]]], token_dims: tuple[int, ...]):
    """Layer-wise tuples of several outputs concatenated layer by layer (None when absent)."""
    if per_output[0] is None:
        return None
    return tuple(_cat_padded(list(layer), token_dims) for layer in zip(*per_output))


def _cat_padded(tensors: list[torch.Tensor], token_dims: tuple[int, ...]) -> torch.Tensor:
    """`tensors` concatenated along dim 0 after zero-padding each of `token_dims` to the longest."""
    longest = {dim: max(t.shape[dim] for t in tensors) for dim in token_dims}
    padded = []
    for tensor in tensors:
        pad = [0] * (2 * tensor.ndim)
        for dim, size in longest.items():  # F.pad lists (left, right) pairs from the last dimension
            pad[2 * (tensor.ndim - 1 - dim) + 1] = size - tensor.shape[dim]
        padded.append(F.pad(tensor, pad) if any(pad) else tensor)
    return torch.cat(padded)
