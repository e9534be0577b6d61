"""Adapter that makes a Hugging Face `BlipForImageTextRetrieval` a vldistill dual encoder with an ITM head.

How the model computes (read in transformers' `modeling_blip.py` / `modeling_blip_text.py`):
- ITC: the image embedding is `vision_proj` of the vision tower's CLS token (after its final layer norm),
  the text embedding `text_proj` of the text encoder's first token run on the text alone (no
  cross-attention), both L2-normalized;
- ITM: the same text encoder run on the text with cross-attention to all the image tokens in every layer
  (the fusion pass), `itm_head` on its first token gives 2 logits (column 1: "matches");
- the HF retrieval model has no learned temperature (the original BLIP's `temp` is not ported), so the
  logit scale is fixed: exp(config.logit_scale_init_value), 1/0.07 with BLIP's default config, and
  `clamp_logit_scale` has nothing to clamp.

ITM hard negatives are sampled as BLIP does: for each image a text drawn with probability softmax(ITC
similarity) over the other texts of the batch, and for each text an image likewise (never the pair itself,
nor a text with the same tokens as the positive's, nor an image with the same pixels, while another remains).
The generator is seeded from the batch's token ids and `itm_seed`, so the same batch draws the same negatives.

`load_blip` is the adapter for model_type "blip" and dispatches on the architecture a folder's config.json
names: BlipForImageTextRetrieval (or none) loads here, BlipForConditionalGeneration through
models/blip_caption.py's loader, any other BLIP head is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval, PreTrainedTokenizerBase

from vldistill.models.adapters import register_adapter
from vldistill.models.blip_signals import BLIP_RETRIEVAL_SIGNALS
from vldistill.models.blip_caption import CAPTIONING_ARCHITECTURE, load_blip_captioner, save_blip_folder
from vldistill.models.blip_student import blip_student_config, inherit_blip_weights, spec_from_blip_config
from vldistill.models.groups import ParameterGroups, tower_groups
from vldistill.models.common import (
    eager_attention,
    load_tokenizer_if_present,
    square_image_size,
    stable_config,
    text_token_settings_from,
)
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD, InputSpec, image_normalization
from vldistill.models.locate import NotAModelError, require_tokenizer
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec

logger = logging.getLogger(__name__)

RETRIEVAL_ARCHITECTURE = "BlipForImageTextRetrieval"


def batch_seed(input_ids: torch.Tensor, seed: int = 0) -> int:
    """A 63-bit seed determined by a batch's token ids and `seed` (the same on every machine and run)."""
    digest = hashlib.blake2b(input_ids.detach().cpu().to(torch.int64).numpy().tobytes(), digest_size=8)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") >> 1


def _same_rows(values: torch.Tensor) -> torch.Tensor:
    """(B, B) True where rows i and j of `values` are equal."""
    _, group = torch.unique(values.reshape(values.shape[0], -1), dim=0, return_inverse=True)
    return group.unsqueeze(1) == group.unsqueeze(0)


@torch.no_grad()
def sample_itm_negatives(
    similarity: torch.Tensor,
    generator: torch.Generator,
    same_text: Optional[torch.Tensor] = None,
    same_image: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(2, B) batch-local hard negatives from (B, B) image->text logits, as BLIP samples them: row 0 a text
    per image drawn from softmax over that image's row, row 1 an image per text from softmax over that text's
    column, never the positive itself; candidates marked in `same_text` / `same_image` (B, B), duplicates of
    the positive, are excluded too unless nothing else remains in that row."""
    size = similarity.shape[0]
    if size < 2:
        raise ValueError("ITM needs at least 2 pairs per batch to draw a negative for each")
    eye = torch.eye(size, dtype=torch.bool, device=similarity.device)
    negatives = []
    for logits, duplicates in ((similarity, same_text), (similarity.t(), same_image)):
        excluded = eye if duplicates is None else eye | duplicates
        excluded = torch.where(excluded.all(dim=1, keepdim=True), eye, excluded)
        weights = logits.float().masked_fill(excluded, float("-inf")).softmax(dim=1)
        negatives.append(torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1))
    return torch.stack(negatives).to(similarity.device)


class BlipRetrievalEncoder(nn.Module):
    """A `BlipForImageTextRetrieval` seen through the dual-encoder interface (ITC embeddings, fixed logit
    scale), whose forward also scores image-text matching pairs (see the module docstring)."""

    signal_names = BLIP_RETRIEVAL_SIGNALS  # what its forward can return (and so its students', build_student)

    def __init__(
        self,
        model: BlipForImageTextRetrieval,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        itm_seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.tokenizer = tokenizer
        self.itm_seed = itm_seed
        self.register_buffer(
            "_logit_scale", torch.tensor(float(model.config.logit_scale_init_value)).exp(), persistent=False
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
    ) -> "BlipRetrievalEncoder":
        """Load a BLIP retrieval checkpoint (local folder or hub id) with its tokenizer when it has one and the
        image mean/std of its preprocessor_config.json (BLIP's, the CLIP values, by default). BLIP's attention
        is eager in transformers 5, so attention maps need nothing more."""
        model = BlipForImageTextRetrieval.from_pretrained(
            name_or_path, attn_implementation="eager", trust_remote_code=trust_remote_code
        )
        mean, std = image_normalization(name_or_path)
        return cls(model, mean, std, load_tokenizer_if_present(name_or_path, trust_remote_code=trust_remote_code))

    # --- what the data and the losses ask of a dual encoder -----------------------------------------

    @property
    def input_spec(self) -> InputSpec:
        """Image size and BLIP's normalization; texts up to the tokenizer's (or position table's) length."""
        positions = self.model.config.text_config.max_position_embeddings
        tokenizer_length = getattr(self.tokenizer, "model_max_length", None) or positions
        return InputSpec(
            image_size=square_image_size(self.model.config.vision_config.image_size, where="the BLIP vision config"),
            image_mean=self.image_mean,
            image_std=self.image_std,
            max_text_length=min(positions, tokenizer_length),
        )

    def text_token_settings(self) -> dict[str, Any]:
        """Vocabulary size, special token ids and text length a CLIP student reading this model's tokenizer
        must use (BERT tokenizers: [CLS] and [SEP] stand in for bos and eos)."""
        return text_token_settings_from(self.tokenizer, self.input_spec.max_text_length, owner="BlipRetrievalEncoder")

    @property
    def embed_dim(self) -> int:
        """Size of the ITC embedding space (BLIP's image_text_hidden_size)."""
        return self.model.config.image_text_hidden_size

    @property
    def logit_scale(self) -> torch.Tensor:
        """The fixed scale multiplying cosine similarities (the HF retrieval model learns none)."""
        return self._logit_scale

    @property
    def logit_bias(self) -> None:
        """BLIP adds no bias to its logits."""
        return None

    @property
    def scores_itm(self) -> bool:
        """True: its forward scores image-text matching pairs (`output_itm`), which a teacher cache can store."""
        return True

    def clamp_logit_scale(self) -> None:
        """Nothing to clamp: the logit scale is fixed."""

    def architecture_spec(self) -> DualEncoderSpec:
        """The per-module spec (vision tower, text encoder, projection size) the layer-wise losses map layers
        of image_* and text_* signals with; its fusion encoder is the text encoder (the same layers run
        with cross-attention), so `fusion` is the text encoder's spec."""
        spec = spec_from_blip_config(self.model.config)
        return dataclasses.replace(spec, fusion=spec.text)

    def parameter_groups(self) -> ParameterGroups:
        """Its parameter groups by name prefix (models/groups.py): the vision tower and the text encoder (also
        the fusion encoder), each with its ITC projection, each of their layers (vision.layers.N, text.layers.N),
        and the ITM head (itm_head)."""
        config = self.model.config
        return {
            **tower_groups("vision", ("model.vision_model.", "model.vision_proj."), "model.vision_model.encoder.layers",
                           config.vision_config.num_hidden_layers),
            **tower_groups("text", ("model.text_encoder.", "model.text_proj."), "model.text_encoder.encoder.layer",
                           config.text_config.num_hidden_layers),
            "itm_head": ("model.itm_head.",),
        }

    def inheritable_clip(self) -> None:
        """None: a CLIP student cannot inherit a BLIP model's weights (a BLIP student can, models/blip_student.py)."""
        return None

    def build_student(self, spec: DualEncoderSpec, inherit: bool) -> "BlipRetrievalEncoder":
        """A fresh BLIP retrieval student with `spec`'s modules (models/blip_student.py), this model's image
        normalization, tokenizer and ITM seed, inheriting its weights per module when `inherit`."""
        model = BlipForImageTextRetrieval(blip_student_config(self.model.config, spec))
        if inherit:
            maps = inherit_blip_weights(model, self.model)
            logger.info("BLIP student inherits teacher layers %s", maps)
        return BlipRetrievalEncoder(model, self.image_mean, self.image_std, self.tokenizer, self.itm_seed)

    def architecture_config(self) -> dict[str, Any]:
        """The BLIP config as stable JSON data."""
        return stable_config(self.model.config)

    def num_parameters(self) -> int:
        """Total parameter count (vision tower, text encoder, projections, ITM head)."""
        return sum(p.numel() for p in self.model.parameters())

    # --- the forward passes ---------------------------------------------------------------------------

    def _image_cls(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.vision_proj(image_tokens[:, 0, :]), dim=-1)

    def _text_cls(self, text_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.text_proj(text_tokens[:, 0, :]), dim=-1)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T_image, W) the vision tower's output tokens (CLS first), what the fusion pass cross-attends to."""
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D): vision_proj of the image CLS token."""
        return self._image_cls(self.image_tokens(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, D): text_proj of the first token of the text-only pass."""
        out = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self._text_cls(out.last_hidden_state)

    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        **flags: bool,
    ) -> tuple[torch.Tensor, Any]:
        """(N, 2) ITM logits of N paired image token sequences (N, T_image, W) and texts, and the fusion
        pass's HF output (hidden states / attention maps when `flags` ask for them)."""
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        fusion = self.model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            **flags,
        )
        return self.model.itm_head(fusion.last_hidden_state[:, 0, :]), fusion

    def sample_negatives(
        self,
        similarity: torch.Tensor,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(2, B) hard negatives for a batch from its (B, B) image->text logits (`sample_itm_negatives`),
        drawn with a generator seeded from the batch's token ids and `itm_seed`."""
        tokens = input_ids if attention_mask is None else input_ids * attention_mask
        generator = torch.Generator().manual_seed(batch_seed(tokens, self.itm_seed))
        return sample_itm_negatives(similarity, generator, _same_rows(tokens), _same_rows(pixel_values))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_itm: bool = False,
        itm_negatives: Optional[torch.Tensor] = None,
        itm_negative_inputs: Optional[dict[str, torch.Tensor]] = None,
    ) -> Signals:
        """ITC embeddings of paired images and texts; with `output_itm`, the ITM logits of the positives and
        of hard negatives in three blocks (models/blip_signals.py): the batch's rows `itm_negatives` (2, B) when
        given (e.g. a teacher's), or the negatives `itm_negative_inputs` holds (row i: `input_ids` /
        `attention_mask` of image i's negative caption, `pixel_values` of caption i's negative image, e.g. read
        from a teacher cache; then no `itm_negatives` are returned), else negatives sampled from the batch;
        hidden states / attention maps of the vision tower, the text-only pass and the fusion pass over the
        positive pairs on request."""
        if itm_negative_inputs is not None and (not output_itm or itm_negatives is not None):
            raise ValueError("itm_negative_inputs are scored only with output_itm=True and without itm_negatives")
        flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        with eager_attention(self.model, enabled=output_attentions):
            vision = self.model.vision_model(pixel_values=pixel_values, **flags)
            text = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, **flags)
            image_embeds = self._image_cls(vision.last_hidden_state)
            text_embeds = self._text_cls(text.last_hidden_state)
            itm, fusion, negatives = {}, {}, None
            if output_itm and itm_negative_inputs is not None:
                negatives = self._given_negatives(itm_negative_inputs, input_ids.shape[0])
            elif output_itm:
                if itm_negatives is None:
                    similarity = self.logit_scale * image_embeds.detach() @ text_embeds.detach().t()
                    itm_negatives = self.sample_negatives(similarity, pixel_values, input_ids, attention_mask)
                itm_negatives = self._checked_negatives(itm_negatives, input_ids.shape[0])
                texts, images = itm_negatives
                mask = None if attention_mask is None else attention_mask[texts]
                negatives = (vision.last_hidden_state[images], input_ids[texts], mask)
            if output_itm or output_hidden_states or output_attentions:
                itm, fusion = self._fusion_signals(
                    vision.last_hidden_state, input_ids, attention_mask, negatives, flags
                )
                if itm_negatives is not None:
                    itm["itm_negatives"] = itm_negatives
        return Signals(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=self.logit_scale,
            text_attention_mask=attention_mask,
            image_hidden_states=vision.hidden_states if output_hidden_states else None,
            text_hidden_states=text.hidden_states if output_hidden_states else None,
            image_attentions=vision.attentions if output_attentions else None,
            text_attentions=text.attentions if output_attentions else None,
            **itm,
            **fusion,
        )

    def _given_negatives(
        self, inputs: dict[str, torch.Tensor], size: int
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The negatives `itm_negative_inputs` holds as (negative images' tokens, negative captions' ids, mask),
        or a ValueError saying what is missing or mis-sized."""
        missing = [key for key in ("pixel_values", "input_ids") if key not in inputs]
        if missing:
            raise ValueError(f"itm_negative_inputs lacks {', '.join(missing)}")
        sizes = {key: int(value.shape[0]) for key, value in inputs.items()}
        if any(rows != size for rows in sizes.values()):
            raise ValueError(f"itm_negative_inputs must hold one negative per pair of the batch of {size}, got {sizes}")
        image_tokens = self.model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        return image_tokens, inputs["input_ids"], inputs.get("attention_mask")

    def _fusion_signals(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        negatives: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
        flags: dict[str, bool],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One fusion pass over the positive pairs, and the negative pairs when `negatives` (each image's negative
        caption ids and mask, each caption's negative image tokens) are given: the ITM logits (when negatives are
        given) and the positives' fusion hidden states / attention maps (when `flags` ask for them), each as a
        dict of signals."""
        size = input_ids.shape[0]
        if negatives is not None:
            negative_images, negative_ids, negative_mask = negatives
            image_tokens = torch.cat([image_tokens, image_tokens, negative_images])
            input_ids, attention_mask = _stack_texts(
                [(input_ids, attention_mask), (negative_ids, negative_mask), (input_ids, attention_mask)],
                self.model.config.text_config.pad_token_id or 0,
            )
        logits, fusion = self.itm_logits(image_tokens, input_ids, attention_mask, **flags)
        itm = {} if negatives is None else {"itm_logits": logits}
        positives = slice(0, size)
        layers = {}
        if flags["output_hidden_states"]:
            layers["fusion_hidden_states"] = _rows(fusion.hidden_states, positives)
        if flags["output_attentions"]:
            layers["fusion_attentions"] = _rows(fusion.attentions, positives)
            layers["fusion_cross_attentions"] = _rows(fusion.cross_attentions, positives)
        return itm, layers

    @staticmethod
    def _checked_negatives(negatives: torch.Tensor, size: int) -> torch.Tensor:
        """`negatives` as (2, B) long indices into a batch of `size`, or a ValueError saying what is wrong."""
        if negatives.shape != (2, size):
            raise ValueError(f"itm_negatives must be (2, {size}) for a batch of {size}, got {tuple(negatives.shape)}")
        if negatives.dtype not in (torch.int32, torch.int64) or negatives.min() < 0 or negatives.max() >= size:
            raise ValueError(f"itm_negatives must hold integer indices in [0, {size}), got {negatives.tolist()}")
        return negatives.long()

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write the model, `tokenizer` (default: its own), a BLIP image processor config and, when given, the
        run metadata `vldistill.json` to `out_dir`, atomically; the folder loads back with `load_blip` and
        `BlipForImageTextRetrieval.from_pretrained`."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("BlipRetrievalEncoder.save_pretrained needs a tokenizer: it has none of its own")
        return save_blip_folder(self.model, tokenizer, self.input_spec, out_dir, metadata)


def _stack_texts(
    texts: list[tuple[torch.Tensor, Optional[torch.Tensor]]], pad_token_id: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Several (ids, mask) text blocks stacked along the batch, each padded to the longest with `pad_token_id`
    and mask 0 (a missing mask is all ones); the mask is None when no block had one."""
    longest = max(ids.shape[1] for ids, _ in texts)
    if all(mask is None for _, mask in texts) and all(ids.shape[1] == longest for ids, _ in texts):
        return torch.cat([ids for ids, _ in texts]), None
    all_ids, masks = [], []
    for ids, mask in texts:
        mask = torch.ones_like(ids) if mask is None else mask
        pad = longest - ids.shape[1]
        all_ids.append(F.pad(ids, (0, pad), value=pad_token_id))
        masks.append(F.pad(mask, (0, pad), value=0))
    return torch.cat(all_ids), torch.cat(masks)


def _rows(per_layer: tuple[torch.Tensor, ...], rows: slice) -> tuple[torch.Tensor, ...]:
    """The given batch rows of every layer's tensor."""
    return tuple(layer[rows] for layer in per_layer)


def blip_architecture(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False) -> str:
    """The architecture a BLIP folder or hub id's config names (BlipForImageTextRetrieval when it names none)."""
    config = BlipConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    architectures = config.architectures or [RETRIEVAL_ARCHITECTURE]
    return architectures[0]


def load_blip_retrieval(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[BlipRetrievalEncoder, PreTrainedTokenizerBase]:
    """A BLIP retrieval checkpoint (folder or hub id) as a BlipRetrievalEncoder, and the tokenizer it holds."""
    model = BlipRetrievalEncoder.from_pretrained(
        name_or_path, attentions=attentions, trust_remote_code=trust_remote_code
    )
    return model, require_tokenizer(model.tokenizer, name_or_path)


# The loader of each BLIP head vldistill reads, by the architecture a folder's config.json names.
BLIP_LOADERS: dict[str, Callable[..., tuple[nn.Module, PreTrainedTokenizerBase]]] = {
    RETRIEVAL_ARCHITECTURE: load_blip_retrieval,
    CAPTIONING_ARCHITECTURE: load_blip_captioner,
}


@register_adapter("blip", "an HF BlipForImageTextRetrieval or BlipForConditionalGeneration")
def load_blip(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A BLIP checkpoint (folder or hub id) and the tokenizer it holds, by the loader of the architecture its
    config names: a retrieval model as a BlipRetrievalEncoder, a captioning model as a BlipCaptioner."""
    architecture = blip_architecture(name_or_path, trust_remote_code=trust_remote_code)
    if architecture not in BLIP_LOADERS:
        raise NotAModelError(
            f"{name_or_path} holds a BLIP {architecture}, which vldistill cannot load; supported BLIP heads: "
            f"{', '.join(sorted(BLIP_LOADERS))}"
        )
    return BLIP_LOADERS[architecture](name_or_path, attentions=attentions, trust_remote_code=trust_remote_code)
