"""What a dual encoder costs before it runs: parameters per tower, FLOPs per image and per text, bytes of
weight files on disk.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add of
matrix products, convolutions and attention; elementwise work (normalization, activations, softmax) is not
counted. Its table has no entry for the CPU attention kernel (`_scaled_dot_product_flash_attention_for_cpu`,
what `F.scaled_dot_product_attention` runs on a CPU), so attention would count 0: `FLOP_FORMULAS` adds the
same count as for the GPU kernels (both products, the full score matrix even under a causal or padding mask),
and counts a dynamically quantized int8 linear layer (torch.ao) as the multiply-adds of its float original.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vldistill.profile.throughput import eval_mode

FLOPS_CONVENTION = (
    "torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add of matrix products, convolutions and "
    "attention (scores and weighted sum over the full score matrix, also under a causal or padding mask; the "
    "CPU attention kernel counted as the GPU ones; an int8 linear layer as its float original); elementwise work "
    "(normalization, activations, softmax) not counted; one image, or one text of text_length tokens"
)
# Files that hold weights in the folders vldistill reads and writes (HF, torch, ONNX with external data).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx.data")


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one scaled-dot-product attention call from its query, key and value shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _int8_linear_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one dynamically quantized linear layer (torch.ao): the multiply-adds of its float original."""
    return 2 * math.prod(input_shape) * out_shape[-1]


FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.quantized.linear_dynamic: _int8_linear_flops,
}


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs of `run()` under `torch.inference_mode()` (see the module docstring for what is counted)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with torch.inference_mode(), counter:
        run()
    return counter.get_total_flops()


@dataclass(frozen=True)
class TowerFlops:
    """FLOPs of embedding one image and one text."""

    image: int
    text: int

    def as_dict(self) -> dict[str, int]:
        """{"image", "text"}."""
        return asdict(self)


def tower_flops(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerFlops:
    """FLOPs of `model.encode_image` on one image and of `model.encode_text` on one text (the first row of
    the given inputs), in eval mode."""
    with eval_mode([model]):
        image = count_flops(lambda: model.encode_image(pixel_values[:1]))
        text = count_flops(lambda: model.encode_text(input_ids[:1], attention_mask[:1]))
    return TowerFlops(image, text)


class _TensorsSeen(TorchDispatchMode):
    """Records the storage of every tensor any operator reads while active."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor):
                self.storages.add(_storage(value))
        return func(*args, **kwargs)


def _storage(tensor: torch.Tensor) -> int:
    """An id of the memory `tensor` views (tensors without one share id 0)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _packed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that keep their weights packed outside `parameters()` (torch.ao's quantized Linear): the
    modules with `_weight_bias`, not counting the packed-weight holder inside such a layer."""
    layers, names = [], []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") or not outer for outer in names)
        if hasattr(module, "_weight_bias") and not inside:
            layers.append(module)
            names.append(name)
    return layers


def _weights(model: nn.Module) -> dict[int, int]:
    """The element count of every weight of `model`, keyed by the id of what holds it: each parameter, and
    each quantized layer whose packed int8 weight and bias are not parameters."""
    sizes = {id(p): p.numel() for p in model.parameters()}
    for module in _packed_layers(model):
        weight, bias = module._weight_bias()
        sizes[id(module)] = weight.numel() + (bias.numel() if bias is not None else 0)
    return sizes


def _used_weights(model: nn.Module, run: Callable[[], Any]) -> set[int]:
    """The ids (as in `_weights`) of the parameters `run()` reads and the quantized layers it calls."""
    seen, called = _TensorsSeen(), set()
    hooks = [module.register_forward_pre_hook(lambda layer, args: called.add(id(layer)))
             for module in _packed_layers(model)]
    try:
        with torch.inference_mode(), seen:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return {id(p) for p in model.parameters() if _storage(p) in seen.storages and _storage(p) != 0} | called


@dataclass(frozen=True)
class TowerParameters:
    """Parameter counts: those `encode_image` reads (image), those `encode_text` reads (text), those both
    read (shared, inside both image and text) and those neither reads (other, e.g. the logit scale);
    image + text - shared + other = total. The packed weights and biases of quantized layers count as the
    parameters they were."""

    total: int
    image: int
    text: int
    shared: int
    other: int

    def as_dict(self) -> dict[str, int]:
        """{"total", "image", "text", "shared", "other"}."""
        return asdict(self)


def tower_parameters(
    model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> TowerParameters:
    """`model`'s parameters split by the tower that reads them, found by running `encode_image` and
    `encode_text` on one input each and recording which parameters their operators read and which quantized
    layers they call (so it holds for any model family, whatever its modules are called)."""
    with eval_mode([model]):
        image = _used_weights(model, lambda: model.encode_image(pixel_values[:1]))
        text = _used_weights(model, lambda: model.encode_text(input_ids[:1], attention_mask[:1]))
    sizes = _weights(model)

    def count(ids: set[int]) -> int:
        return sum(sizes[i] for i in ids)

    return TowerParameters(
        total=sum(sizes.values()),
        image=count(image),
        text=count(text),
        shared=count(image & text),
        other=count(sizes.keys() - image - text),
    )


def weight_bytes(folder: str | os.PathLike, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> Optional[int]:
    """Bytes of the weight files (names ending in `suffixes`) in `folder` itself (a model folder is flat; a
    subfolder is another model, e.g. an export's `int8/` pair); None when `folder` is not a local folder
    (e.g. a hub id)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    return sum(path.stat().st_size for path in root.iterdir() if path.is_file() and path.name.endswith(suffixes))
