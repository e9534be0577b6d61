"""Prompt memory: the learnable prompts (and projector) a prompted student (models/prompts.py) had at the end of
each domain it was distilled on, stored by domain name beside the model in `prompt_memory.safetensors` (keys
`<domain>/<tensor>`, e.g. `shapes-a/prompts.text`; the domains' order in its metadata). A student re-distilled on
a new domain keeps its earlier domains' prompts here; evaluating it on an old domain swaps that domain's prompts
in (`use_domain_prompts`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from vldistill.fileio import read_safetensors, write_safetensors_atomic
from vldistill.models.prompts import PromptedDualEncoder

PROMPT_MEMORY_FILE = "prompt_memory.safetensors"

PromptMemory = dict[str, dict[str, torch.Tensor]]
"""Domain name -> the prompted model's `prompt_state()` for it, in the order the domains were learned."""


def read_prompt_memory(folder: str | os.PathLike) -> PromptMemory:
    """The prompt memory saved in model folder `folder` (empty when it has none)."""
    path = Path(folder) / PROMPT_MEMORY_FILE
    if not path.exists():
        return {}
    try:
        tensors, metadata = read_safetensors(path)
        domains = json.loads(metadata["domains"])
    except (OSError, SafetensorError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a readable prompt memory ({error})") from None
    memory: PromptMemory = {domain: {} for domain in domains}
    for key, tensor in tensors.items():
        domain, _, name = key.partition("/")
        if domain not in memory:
            raise ValueError(f"{path}: tensor {key} belongs to no listed domain ({', '.join(domains)})")
        memory[domain][name] = tensor
    return memory


def write_prompt_memory(folder: str | os.PathLike, memory: PromptMemory) -> Path:
    """Save `memory` in model folder `folder` atomically."""
    for domain in memory:
        if not domain or "/" in domain:
            raise ValueError(f"a prompt memory's domain name must be non-empty without '/', got {domain!r}")
    tensors = {f"{domain}/{name}": t.contiguous() for domain, state in memory.items() for name, t in state.items()}
    return write_safetensors_atomic(Path(folder) / PROMPT_MEMORY_FILE, tensors, {"domains": json.dumps(list(memory))})


def remember(memory: PromptMemory, domain: str, model: PromptedDualEncoder) -> PromptMemory:
    """`memory` with `model`'s current prompts stored as `domain`'s (replacing what it held for `domain`)."""
    state = {name: tensor.clone() for name, tensor in model.prompt_state().items()}  # a copy, not the live parameters
    return {**{d: s for d, s in memory.items() if d != domain}, domain: state}


def use_domain_prompts(model: PromptedDualEncoder, memory: PromptMemory, domain: str) -> None:
    """Load `domain`'s stored prompts into `model` (in place). ValueError for a domain the memory lacks or prompts
    of another shape (another prompt configuration)."""
    if domain not in memory:
        raise ValueError(f"the prompt memory holds no prompts of domain {domain!r} (it holds: {', '.join(memory) or 'none'})")
    current = model.prompt_state()
    stored = memory[domain]
    if set(stored) != set(current) or any(stored[n].shape != current[n].shape for n in current):
        raise ValueError(f"the stored prompts of domain {domain!r} do not fit this model's prompts (another prompt configuration)")
    model.load_state_dict(stored, strict=False)
