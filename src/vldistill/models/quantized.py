"""Int8 CLIP dual encoders: every `nn.Linear` of a CLIPModel runs as a dynamically quantized int8 layer
(int8 weights, activations quantized per call), their folder format and its loader.

The kernels are torch.ao's dynamic quantized Linear (`torch.ao.quantization.quantize_dynamic`, fbgemm/x86 on
CPU). torchao's `Int8DynamicActivationInt8WeightConfig` was measured against it and was slower on this CPU at
every layer size tried (see NOTES.md), so torch.ao is kept although torch marks that API deprecated; its
deprecation warnings are silenced here. The numerics (what `export.quantize.QuantSimLinear` simulates for
quantization-aware training): weights symmetric int8 (scale = max |w| / 127.5, per tensor or per output
channel), activations asymmetric over [0, 127] per tensor, their range taken from each call's input.

A quantized folder holds the CLIP folder's `config.json`, tokenizer and `preprocessor_config.json`, the weights
in `model.int8.safetensors` (each quantized layer's int8 weight, its scales as float64 and its fp32 bias;
every other tensor in fp32) and `clip_int8.json` (the recipe), which marks the folder for
`models.loading.load_dual_encoder_any`. The int8 weights are stored as they are, so a loaded model computes
exactly what the saved one did. Transformers cannot load such a folder (it has no `model.safetensors`).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from vldistill.fileio import atomic_directory
from vldistill.models.adapters import register_adapter
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.common import load_tokenizer_if_present
from vldistill.models.inputs import image_normalization
from vldistill.models.io import image_processor_for, write_metadata
from vldistill.models.locate import ModelNotFoundError, require_tokenizer

RECIPE_FILE = "clip_int8.json"
WEIGHTS_FILE = "model.int8.safetensors"
FORMAT = "vldistill-int8-dynamic"
BACKEND = "torch.ao"
GRANULARITIES = ("per-tensor", "per-channel")
SCALE_SUFFIX = ".weight_scale"
# torch.ao quantization and quantized tensors are deprecated in torch 2.13 but are the fastest int8 kernels here.
_DEPRECATION_MESSAGES = (
    r"torch\.ao\.quantization is deprecated", r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


@dataclass(frozen=True)
class Int8Recipe:
    """How a model was quantized: int8 weights with one scale per tensor or per output channel
    (`granularity`), activations quantized dynamically per tensor, on torch.ao's kernels."""

    granularity: str = "per-tensor"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"int8 weight granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    @property
    def per_channel(self) -> bool:
        """Whether each output channel of a weight has its own scale."""
        return self.granularity == "per-channel"

    def as_dict(self) -> dict[str, Any]:
        """The recipe as `clip_int8.json` stores it."""
        return {"format": FORMAT, "backend": BACKEND, "dtype": "qint8", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "Int8Recipe":
        """The recipe stored in a `clip_int8.json` (`where` names it in errors)."""
        if data.get("format") != FORMAT:
            raise ModelNotFoundError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        return cls(granularity=data.get("granularity", "per-tensor"))


@contextmanager
def _torch_ao_quiet() -> Iterator[None]:
    """The block without torch.ao's deprecation warnings (the API is chosen knowingly, see the module docstring)."""
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield


def quantized_linears(module: nn.Module) -> dict[str, nnqd.Linear]:
    """The dynamically quantized Linear layers of `module` by qualified name."""
    return {name: child for name, child in module.named_modules() if isinstance(child, nnqd.Linear)}


def quantize_linears(model: CLIPModel, recipe: Int8Recipe) -> CLIPModel:
    """A copy of `model` with every `nn.Linear` replaced by a dynamically quantized int8 Linear (weights
    quantized now as `recipe` says), in eval mode; `model` itself is left as it is."""
    qconfig = per_channel_dynamic_qconfig if recipe.per_channel else default_dynamic_qconfig
    with _torch_ao_quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: qconfig}, dtype=torch.qint8)


def _int8_linear(weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> nnqd.Linear:
    """A quantized Linear holding the int8 `weight` (out, in) with `scale` (a scalar: per tensor; one per row:
    per channel) and zero points 0."""
    out_features, in_features = weight.shape
    with _torch_ao_quiet():
        if scale.ndim == 0:
            qweight = torch._make_per_tensor_quantized_tensor(weight, float(scale), 0)
        else:
            zeros = torch.zeros(out_features, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(weight, scale.to(torch.float64), zeros, 0)
        layer = nnqd.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, bias)
    return layer


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a quantized model as plain tensors for safetensors: for each quantized Linear `name`,
    `name.weight` (int8), `name.weight_scale` (float64: a scalar, or one per output channel) and `name.bias`
    (fp32, when it has one); every other entry of the state dict as it is."""
    layers = quantized_linears(model)
    tensors = {
        key: value.detach().contiguous()
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor) and not any(key.startswith(name + ".") for name in layers)
    }
    for name, layer in layers.items():
        weight, bias = layer._weight_bias()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scale = torch.tensor(weight.q_scale(), dtype=torch.float64)
            zero_points = torch.tensor([weight.q_zero_point()])
        else:
            scale, zero_points = weight.q_per_channel_scales().to(torch.float64), weight.q_per_channel_zero_points()
        if zero_points.any():
            raise ValueError(f"{name}: int8 weights with non-zero zero points are not supported")
        tensors[f"{name}.weight"] = weight.int_repr().contiguous()
        tensors[name + SCALE_SUFFIX] = scale.contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    return tensors


def load_int8_state(model: CLIPModel, tensors: Mapping[str, torch.Tensor], where: str) -> CLIPModel:
    """Put `tensors` (see `int8_state`) into a freshly built float `model` of the same config, in place: the
    float tensors load into their places, then the layers with a stored scale become quantized Linears. A
    tensor missing or left over raises ModelNotFoundError naming it and `where`."""
    layers = [key[: -len(SCALE_SUFFIX)] for key in tensors if key.endswith(SCALE_SUFFIX)]
    int8 = {key for name in layers for key in (f"{name}.weight", f"{name}.bias", name + SCALE_SUFFIX)}
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if k not in int8}, strict=False)
    missing = [key for key in missing if key not in int8]
    if missing or unexpected:
        problem = f"lacks {', '.join(missing)}" if missing else f"holds unknown tensors {', '.join(unexpected)}"
        raise ModelNotFoundError(f"{where} {problem}")
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        linear = getattr(model.get_submodule(parent_name), child, None)
        weight = tensors.get(f"{name}.weight")
        if not isinstance(linear, nn.Linear) or weight is None or weight.dtype != torch.int8:
            raise ModelNotFoundError(f"{where}: {name} is not an int8 Linear layer of this config")
        bias = tensors.get(f"{name}.bias")
        if (bias is None) != (linear.bias is None) or weight.shape != linear.weight.shape:
            raise ModelNotFoundError(f"{where}: {name} does not match the config's layer")
        setattr(model.get_submodule(parent_name), child, _int8_linear(weight, tensors[name + SCALE_SUFFIX], bias))
    return model.eval()


class Int8CLIPDualEncoder(CLIPDualEncoder):
    """A CLIP dual encoder whose Linear layers compute in int8 (inference only), with the `recipe` it was
    quantized with."""

    def __init__(self, model: CLIPModel, image_mean, image_std, recipe: Int8Recipe) -> None:
        super().__init__(model, image_mean, image_std)
        self.recipe = recipe

    @classmethod
    def from_float(cls, clip: CLIPDualEncoder, recipe: Int8Recipe = Int8Recipe()) -> "Int8CLIPDualEncoder":
        """`clip`'s weights quantized as `recipe` says (`clip` itself is not changed)."""
        return cls(quantize_linears(clip.model, recipe), clip.image_mean, clip.image_std, recipe)

    def inheritable_clip(self) -> None:
        """No weights to inherit: a student inherits float weights, not int8 ones."""
        return None

    def num_parameters(self) -> int:
        """Weights of every layer, the int8 ones included (their packed weights are no `nn.Parameter`s)."""
        packed = 0
        for layer in quantized_linears(self.model).values():
            weight, bias = layer._weight_bias()
            packed += weight.numel() + (bias.numel() if bias is not None else 0)
        return sum(p.numel() for p in self.model.parameters()) + packed

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        metadata: Optional[dict[str, Any]] = None,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ) -> Path:
        """Write the quantized folder (see the module docstring) to `out_dir` atomically, with `tokenizer`
        (required) and `vldistill.json` when `metadata` is given."""
        if tokenizer is None:
            raise ValueError("Int8CLIPDualEncoder.save_pretrained needs the tokenizer to save with the model")
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            write_int8_folder(self, tokenizer, tmp)
            if metadata is not None:
                write_metadata(tmp, metadata)
        return out_dir


def write_int8_folder(model: Int8CLIPDualEncoder, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Write the files of a quantized folder (config, int8 weights, recipe, tokenizer, image processor) into
    a folder being assembled."""
    folder = Path(folder)
    model.model.config.save_pretrained(folder)
    save_file(int8_state(model.model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / RECIPE_FILE).write_text(json.dumps(model.recipe.as_dict(), indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
    spec = model.input_spec
    image_processor_for(spec.image_size, spec.image_mean, spec.image_std).save_pretrained(folder)


def read_recipe(folder: str | os.PathLike) -> Int8Recipe:
    """The recipe in a quantized folder's `clip_int8.json`."""
    path = Path(folder) / RECIPE_FILE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path}: expected a JSON object")
    return Int8Recipe.from_dict(data, str(path))


@register_adapter("clip-int8", f"a vldistill int8 CLIP folder: {RECIPE_FILE}", marker=RECIPE_FILE)
def load_int8_clip(
    name_or_path: str | os.PathLike, *, attentions: bool = False, trust_remote_code: bool = False
) -> tuple[Int8CLIPDualEncoder, PreTrainedTokenizerBase]:
    """A quantized folder (written by `Int8CLIPDualEncoder.save_pretrained`) as the int8 model it holds, with
    its tokenizer; eager attention when attention maps are needed. `trust_remote_code` is not used."""
    folder = Path(name_or_path)
    recipe = read_recipe(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelNotFoundError(f"{folder} has {RECIPE_FILE} but no {WEIGHTS_FILE}")
    config = CLIPConfig.from_pretrained(folder)
    model = CLIPModel._from_config(config, attn_implementation="eager" if attentions else "sdpa")
    load_int8_state(model, load_file(str(weights)), str(weights))
    tokenizer = require_tokenizer(load_tokenizer_if_present(folder), folder)
    return Int8CLIPDualEncoder(model, *image_normalization(folder), recipe), tokenizer
