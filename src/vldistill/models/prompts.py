"""Learnable prompts on a CLIP or SigLIP dual encoder, as prompt learning (CoOp, VPT) and prompt
distillation (PromptKD) use them: `PromptedDualEncoder(base, PromptConfig(...))`.

- Text (CoOp, Zhou et al., 2022): `n_ctx` learnable token embeddings are inserted into every text right
  after its first (BOS) token, or at its start when the tokenizer adds no BOS. The wrapper lengthens the
  ids by `n_ctx` placeholder ids (and the attention mask by ones), and a hook on the text tower's token
  embedding puts the context vectors in their place, so the model adds its position embeddings to them and
  pools as it always does: CLIP at the (shifted) EOS token, SigLIP at the last position. A prompted model
  reads texts `n_ctx` tokens shorter than its base (`input_spec.max_text_length`).
- Image (VPT-deep, Jia et al., 2022): `n_vis` learnable tokens per layer for the first `depth` layers of the
  vision encoder, appended after the patch tokens at the input of each of those layers (layer i's tokens
  replace the outputs of layer i - 1's, they never accumulate); the outputs of the last prompted layer's
  tokens flow through the later layers, as in VPT, and are dropped after the encoder, so CLIP still pools
  its CLS token and SigLIP's attention head still pools the patch tokens only.
- A projector: a linear map from the embedding size to `projector_dim` (a teacher's), for losses that
  compare the student with a wider teacher (`project`).

The prompts are ordinary parameters named `prompts.text` (n_ctx, text width) and `prompts.vision`
(depth, n_vis, vision width), the projector's `projector.weight` / `projector.bias`; the base model's are
`base.*`. The hooks are installed for the duration of each call only: the base model run on its own is
unchanged. Hidden states and attention maps are returned at the positions of the input tokens only (the
prompt positions are removed, so they line up with an unprompted teacher's for layer-wise losses; an
attention row then sums to less than 1, by the weight it gave the prompts).

A saved prompted model is its base model's plain HF folder plus `prompted.json` (the PromptConfig, the base
model type and the text insertion offset) and `prompts.safetensors`; `models.prompted` registers its loader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.distributed import all_gather_rows
from vldistill.fileio import atomic_directory
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.groups import ParameterGroups, nested_groups
from vldistill.models.inputs import InputSpec
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.signals import SignalKind, Signals, cat_rows, primary, register_signal
from vldistill.models.spec import DualEncoderSpec

PROMPTED_FILE = "prompted.json"
PROMPTS_FILE = "prompts.safetensors"
PROMPT_INIT_STD = 0.02  # CoOp's random context initialization
PROJECTOR_TO_TEACHER = "teacher"  # projector_dim: the teacher's embedding size, resolved when the student is built
# The families whose towers the prompts know how to enter (the exact adapter class: a subclass such as the
# int8 CLIP computes its layers another way), by the model_type their folders are saved under.
PROMPTABLE = {CLIPDualEncoder: "clip", SiglipDualEncoder: "siglip"}

# What a prompted model with a projector returns on request (`output_projection=True`, asked for only when a
# loss lists it among its student_needs): its image embeddings in the projector's (a teacher's) space.
PROJECTED_IMAGE_EMBEDS = register_signal(SignalKind(
    name="projected_image_embeds",
    description="(B, P) a prompted student's image embeddings mapped by its projector into a teacher's space, L2-normalized",
    concat=cat_rows,
    gather=all_gather_rows,
    combine=primary,
    request="output_projection",
    primary_only=True,
    cache_refusal="which only a prompted student computes, never a teacher",
))


@dataclass
class PromptConfig:
    """Learnable prompts (`student.prompts` in a config; null: none).

    n_ctx: CoOp context tokens inserted after each text's first (BOS) token (0: none).
    ctx_init: a phrase (e.g. "a photo of a") whose token embeddings initialize the context, exactly n_ctx
        tokens long; null: random normal, std 0.02.
    n_vis: VPT-deep visual prompt tokens per prompted vision layer (0: none).
    depth: how many vision layers, from the first, get their own visual prompts (1..layers when n_vis > 0).
    projector_dim: output size of the linear projector from the embedding space (an int, "teacher" for the
        teacher's embedding size, null: no projector).
    """

    n_ctx: int = 4
    ctx_init: Optional[str] = None
    n_vis: int = 0
    depth: int = 0
    projector_dim: Optional[Union[int, str]] = None

    def validate(self, where: str) -> None:
        """Raise ValueError naming `where`.<field> when a value is impossible."""
        for name in ("n_ctx", "n_vis", "depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        if self.ctx_init is not None and (self.n_ctx == 0 or not self.ctx_init.strip()):
            raise ValueError(f"{where}.ctx_init needs n_ctx > 0 and a non-empty phrase, got {self.ctx_init!r} with n_ctx {self.n_ctx}")
        if (self.n_vis == 0) != (self.depth == 0):
            raise ValueError(f"{where}: n_vis and depth go together (both 0 or both > 0), got n_vis {self.n_vis}, depth {self.depth}")
        projector = self.projector_dim
        if isinstance(projector, bool) or not (
            projector is None or projector == PROJECTOR_TO_TEACHER or (isinstance(projector, int) and projector >= 1)
        ):
            raise ValueError(f"{where}.projector_dim must be a positive int, {PROJECTOR_TO_TEACHER!r} or null, got {projector!r}")


class PromptParameters(nn.Module):
    """The learnable prompts: `text` (n_ctx, text width) and `vision` (depth, n_vis, vision width), each
    None when there are none."""

    def __init__(self, text: Optional[torch.Tensor], vision: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.text = None if text is None else nn.Parameter(text)
        self.vision = None if vision is None else nn.Parameter(vision)


def text_insert_offset(tokenizer: Optional[PreTrainedTokenizerBase]) -> int:
    """Where context tokens go in a text: 1 (after the BOS / CLS token) when `tokenizer` starts its texts with
    one, 0 when it adds none; 1 without a tokenizer (CLIP's convention)."""
    if tokenizer is None:
        return 1
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    ids = tokenizer("a")["input_ids"]
    return 1 if bos is not None and ids and ids[0] == bos else 0


class PromptedDualEncoder(nn.Module):
    """A CLIP or SigLIP dual encoder with learnable text context, deep visual prompts and a projector (see the
    module docstring). It satisfies `models.contract.DualEncoder`; everything not about prompts is the base's.

    tokenizer: the base's tokenizer; needed for `ctx_init` and to save a CLIP (whose adapter keeps none).
    generator: draws the prompts' random initializations (default: the global RNG, seeded by the run; the
        projector's always comes from the global RNG).
    text_offset: where the context goes (default: from the tokenizer, see `text_insert_offset`)."""

    def __init__(
        self,
        base: nn.Module,
        config: PromptConfig,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        generator: Optional[torch.Generator] = None,
        text_offset: Optional[int] = None,
    ) -> None:
        super().__init__()
        if type(base) not in PROMPTABLE:
            raise ValueError(
                f"learnable prompts need a CLIP or SigLIP dual encoder, got a {type(base).__name__} "
                f"(promptable: {', '.join(cls.__name__ for cls in PROMPTABLE)})"
            )
        config.validate("prompts")
        if not isinstance(config.projector_dim, (int, type(None))):
            raise ValueError(f"prompts.projector_dim {config.projector_dim!r} must be resolved to a size before building")
        self.base, self.config = base, config
        self.tokenizer = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
        self.text_offset = text_insert_offset(self.tokenizer) if text_offset is None else text_offset
        hf = base.model
        layers = len(hf.vision_model.encoder.layers)
        if config.depth > layers:
            raise ValueError(f"prompts.depth {config.depth} exceeds the vision tower's {layers} layers")
        if config.n_ctx >= hf.config.text_config.max_position_embeddings:
            raise ValueError(
                f"prompts.n_ctx {config.n_ctx} leaves no room for text in {hf.config.text_config.max_position_embeddings} positions"
            )
        self.prompts = PromptParameters(self._initial_context(generator), self._initial_visual(generator))
        self.projector = None if config.projector_dim is None else nn.Linear(base.embed_dim, config.projector_dim)

    def _initial_context(self, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """The context vectors to start from: the phrase's token embeddings, else random (std 0.02)."""
        n, token_embedding = self.config.n_ctx, self.base.model.text_model.embeddings.token_embedding
        if n == 0:
            return None
        if self.config.ctx_init is None:
            shape = (n, token_embedding.embedding_dim)
            return torch.randn(shape, generator=generator, dtype=token_embedding.weight.dtype) * PROMPT_INIT_STD
        if self.tokenizer is None:
            raise ValueError("prompts.ctx_init needs the model's tokenizer (tokenizer=...) to embed the phrase")
        ids = self.tokenizer(self.config.ctx_init, add_special_tokens=False)["input_ids"]
        if len(ids) != n:
            raise ValueError(f"prompts.ctx_init {self.config.ctx_init!r} is {len(ids)} tokens, but n_ctx is {n}: make them agree")
        return token_embedding.weight.detach()[torch.tensor(ids)].clone()

    def _initial_visual(self, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """Random (std 0.02) visual prompts, (depth, n_vis, vision width), None without any."""
        if self.config.n_vis == 0:
            return None
        vision = self.base.model.config.vision_config
        shape = (self.config.depth, self.config.n_vis, vision.hidden_size)
        return torch.randn(shape, generator=generator) * PROMPT_INIT_STD

    # --- the contract, delegated to the base ------------------------------------------------------------

    @property
    def input_spec(self) -> InputSpec:
        """The base's, with texts n_ctx tokens shorter (the context takes those positions)."""
        spec = self.base.input_spec
        return dataclasses.replace(spec, max_text_length=spec.max_text_length - self.config.n_ctx)

    @property
    def embed_dim(self) -> int:
        """Size of the shared image-text embedding space (the base's)."""
        return self.base.embed_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        """The base's exponentiated temperature."""
        return self.base.logit_scale

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        """The base's logit bias (SigLIP's b, None for CLIP)."""
        return self.base.logit_bias

    def clamp_logit_scale(self) -> None:
        """Clamp the base's learned temperature."""
        self.base.clamp_logit_scale()

    def text_token_settings(self) -> dict[str, Any]:
        """The base's vocabulary size, special token ids and text length."""
        return self.base.text_token_settings()

    def architecture_spec(self) -> Optional[DualEncoderSpec]:
        """The base's tower spec (hidden states come at the input tokens' positions, as the base's do)."""
        return self.base.architecture_spec()

    def inheritable_clip(self):
        """The base's CLIPModel (None for SigLIP): a CLIP student may inherit its weights, not the prompts."""
        return self.base.inheritable_clip()

    def parameter_groups(self) -> ParameterGroups:
        """The base's parameter groups (vision, text, vision.layers.N, ...) under `base.`; the prompts and the
        projector are selected by their own names (train/stages.py)."""
        return nested_groups("base", self.base.parameter_groups())

    def architecture_config(self) -> dict[str, Any]:
        """The base's architecture plus the prompt settings, as JSON data."""
        return {**self.base.architecture_config(), "prompted": self.prompted_record()}

    def prompted_record(self) -> dict[str, Any]:
        """What `prompted.json` holds: the prompt config, the base model type and the text insertion offset."""
        return {
            "prompts": dataclasses.asdict(self.config),
            "base_model_type": PROMPTABLE[type(self.base)],
            "text_offset": self.text_offset,
        }

    # --- embeddings ------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (B, D) with the visual prompts."""
        with self._prompting(vision=True, text=False):
            return self.base.encode_image(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalized text embeddings (B, D) with the context tokens inserted."""
        input_ids, attention_mask, _ = self._with_context(input_ids, attention_mask)
        with self._prompting(vision=False, text=True):
            return self.base.encode_text(input_ids, attention_mask)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_projection: bool = False,
    ) -> Signals:
        """Both towers with their prompts on paired images and texts; hidden states and attention maps on
        request, at the input tokens' positions only (see the module docstring); with `output_projection`, the
        projected image embeddings too (`projected_image_embeds`, see `project`)."""
        extended_ids, extended_mask, kept_mask = self._with_context(input_ids, attention_mask)
        with self._prompting(vision=True, text=True) as state:
            out = self.base(pixel_values, extended_ids, extended_mask, output_hidden_states, output_attentions)
        changes: dict[str, Any] = {"text_attention_mask": kept_mask}
        text_keep = self._text_positions(extended_ids.shape[1], extended_ids.device)
        image_keep = state.get("image_tokens")
        for name in ("text_hidden_states", "image_hidden_states", "text_attentions", "image_attentions"):
            if out.get(name) is not None:
                if name.startswith("text"):
                    keep = text_keep
                else:
                    keep = None if image_keep is None else torch.arange(image_keep, device=pixel_values.device)
                changes[name] = tuple(strip_positions(t, keep, maps=name.endswith("attentions")) for t in out[name])
        if output_projection:
            changes["projected_image_embeds"] = self.project(out.image_embeds)
        return out.replace(**changes)

    def project(self, embeddings: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """`embeddings` (B, embed_dim) mapped by the projector to (B, projector_dim), L2-normalized unless
        `normalize` is False; ValueError when the model has no projector."""
        if self.projector is None:
            raise ValueError("this prompted model has no projector (prompts.projector_dim is null)")
        projected = self.projector(embeddings)
        return F.normalize(projected, dim=-1) if normalize else projected

    # --- how the prompts enter the towers ----------------------------------------------------------------

    def _with_context(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(ids with n_ctx placeholder ids inserted at the offset, the mask with ones there, the mask of the
        input positions kept). Texts too long for the positions left lose trailing columns that are padding
        in every row; when that is not enough, ValueError naming the lengths."""
        n = self.config.n_ctx
        if n == 0:
            return input_ids, attention_mask, attention_mask
        limit = self.base.model.config.text_config.max_position_embeddings
        excess = input_ids.shape[1] + n - limit
        if excess > 0:
            used = input_ids.shape[1] if attention_mask is None else int(attention_mask.any(0).nonzero().max()) + 1
            if input_ids.shape[1] - excess < used:
                raise ValueError(
                    f"texts of {input_ids.shape[1]} tokens with {n} context tokens exceed the text tower's {limit} "
                    f"positions: tokenize to at most {limit - n} tokens (the prompted model's input_spec.max_text_length)"
                )
            input_ids = input_ids[:, : input_ids.shape[1] - excess]
            attention_mask = None if attention_mask is None else attention_mask[:, : attention_mask.shape[1] - excess]
        at, batch = self.text_offset, input_ids.shape[0]
        eos = self.base.model.config.text_config.eos_token_id
        placeholder = 0 if eos != 0 else 1  # never the EOS id CLIP pools at, never the largest id (legacy CLIP)
        fill = input_ids.new_full((batch, n), placeholder)
        ids = torch.cat([input_ids[:, :at], fill, input_ids[:, at:]], dim=1)
        if attention_mask is None:
            return ids, None, None
        mask = torch.cat([attention_mask[:, :at], attention_mask.new_ones((batch, n)), attention_mask[:, at:]], dim=1)
        return ids, mask, attention_mask

    def _text_positions(self, length: int, device: torch.device) -> Optional[torch.Tensor]:
        """Indices of the input tokens among `length` positions with the context inserted (None: no context)."""
        n, at = self.config.n_ctx, self.text_offset
        if n == 0:
            return None
        positions = torch.arange(length, device=device)
        return positions[(positions < at) | (positions >= at + n)]

    @contextmanager
    def _prompting(self, *, vision: bool, text: bool) -> Iterator[dict[str, int]]:
        """Install the prompt hooks on the base model's towers for the block, and remove them after it.
        Yields a dict where the vision hooks record `image_tokens`, the unprompted token count."""
        state: dict[str, int] = {}
        hf = self.base.model
        with ExitStack() as stack:
            if text and self.prompts.text is not None:
                embedding = hf.text_model.embeddings.token_embedding
                stack.callback(embedding.register_forward_hook(self._insert_context).remove)
            if vision and self.prompts.vision is not None:
                encoder = hf.vision_model.encoder
                for index in range(self.config.depth):
                    hook = self._visual_prompt_hook(index, state)
                    stack.callback(encoder.layers[index].register_forward_pre_hook(hook, with_kwargs=True).remove)
                stack.callback(encoder.register_forward_hook(self._drop_visual_prompts(state)).remove)
            yield state

    def _insert_context(self, module: nn.Module, args: tuple, embeds: torch.Tensor) -> torch.Tensor:
        """Forward hook of the token embedding: the context vectors in place of the placeholder rows."""
        at, n = self.text_offset, self.config.n_ctx
        context = self.prompts.text.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([embeds[:, :at], context, embeds[:, at + n:]], dim=1)

    def _visual_prompt_hook(self, index: int, state: dict[str, int]):
        """Forward pre-hook of vision layer `index`: layer 0 appends its prompts after the tokens (recording
        their count), a later layer replaces the previous layer's prompt outputs with its own."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                state["image_tokens"] = hidden.shape[1]
            tokens = hidden[:, : state["image_tokens"]]
            prompts = self.prompts.vision[index].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([tokens, prompts], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    @staticmethod
    def _drop_visual_prompts(state: dict[str, int]):
        """Forward hook of the vision encoder: its last hidden state without the prompt tokens, so the
        pooling (CLS token, SigLIP's attention head) sees the image tokens only."""

        def hook(module: nn.Module, args: tuple, output):
            output.last_hidden_state = output.last_hidden_state[:, : state["image_tokens"]]
            return output

        return hook

    # --- saving ----------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write the base model's HF folder (with `tokenizer`, default the model's own, and `vldistill.json`
        when `metadata` is given) plus `prompted.json` and `prompts.safetensors` to `out_dir`, atomically;
        `models.loading.load_dual_encoder_any` reads it back with its prompts."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with atomic_directory(out_dir) as tmp:
            self.base.save_pretrained(tmp, metadata, tokenizer=tokenizer)
            (tmp / PROMPTED_FILE).write_text(json.dumps(self.prompted_record(), indent=2, sort_keys=True) + "\n")
            save_file(self.prompt_state(), str(tmp / PROMPTS_FILE))
        return Path(out_dir)

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The prompts' and the projector's tensors by parameter name (`prompts.*`, `projector.*`)."""
        return {
            name: tensor.detach().contiguous().cpu()
            for name, tensor in self.state_dict().items()
            if name.startswith(("prompts.", "projector."))
        }


def strip_positions(tensor: torch.Tensor, keep: Optional[torch.Tensor], maps: bool) -> torch.Tensor:
    """A hidden state (B, N, W) or attention map (B, heads, N, N) at the token positions `keep` only
    (`maps`: rows and columns of a map); unchanged when `keep` is None."""
    if keep is None:
        return tensor
    if maps:
        return tensor.index_select(2, keep).index_select(3, keep)
    return tensor.index_select(1, keep)


def with_prompts(
    student: nn.Module, config: PromptConfig, tokenizer: Optional[PreTrainedTokenizerBase], teacher_embed_dim: int
) -> PromptedDualEncoder:
    """`student` wrapped in the learnable prompts `config` describes (random parts drawn from the global RNG),
    a projector_dim of "teacher" resolved to `teacher_embed_dim`."""
    if config.projector_dim == PROJECTOR_TO_TEACHER:
        config = dataclasses.replace(config, projector_dim=teacher_embed_dim)
    return PromptedDualEncoder(student, config, tokenizer=tokenizer)
