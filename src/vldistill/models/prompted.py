"""The loader of saved prompted models (models/prompts.py): a base model's HF folder marked by
`prompted.json`, which names the base model type and the prompt settings, with the prompts and projector in
`prompts.safetensors`. The base loads with its own family's adapter, then is wrapped and given its prompts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from vldistill.binding import build_dataclass
from vldistill.models.adapters import ADAPTERS, register_adapter
from vldistill.models.prompts import PROMPTABLE, PROMPTED_FILE, PROMPTS_FILE, PromptConfig, PromptedDualEncoder

PROMPTED_MODEL_TYPE = "prompted"


@register_adapter(PROMPTED_MODEL_TYPE, "a vldistill CLIP or SigLIP with learnable prompts: prompted.json", marker=PROMPTED_FILE)
def load_prompted(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[PromptedDualEncoder, PreTrainedTokenizerBase]:
    """A saved prompted model (a local folder with `prompted.json`): its base loaded by the base family's
    adapter, wrapped with the saved prompt settings, prompts and projector; and the tokenizer it holds."""
    folder = Path(name_or_path)
    record_path = folder / PROMPTED_FILE
    try:
        record = json.loads(record_path.read_text())
        base_type, prompts, offset = record["base_model_type"], record["prompts"], int(record["text_offset"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{record_path}: not a readable prompted-model record ({error})") from None
    if base_type not in PROMPTABLE.values():
        raise ValueError(f"{record_path}: base_model_type {base_type!r} cannot carry prompts (only {', '.join(PROMPTABLE.values())})")
    config = build_dataclass(PromptConfig, prompts, f"{record_path}: prompts")
    base, tokenizer = ADAPTERS.get(base_type).load(folder, attentions=attentions, trust_remote_code=trust_remote_code)
    model = PromptedDualEncoder(base, config, tokenizer=tokenizer, text_offset=offset)
    state = load_file(str(folder / PROMPTS_FILE))
    expected = model.prompt_state()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder / PROMPTS_FILE}: tensors do not match {PROMPTED_FILE} (missing {missing}, unexpected {unexpected})")
    model.load_state_dict(state, strict=False)
    return model.eval(), tokenizer
