"""What every dual encoder (teacher or student) returns: the contract the losses and the loop meet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


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
