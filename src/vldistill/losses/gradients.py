"""Per-loss gradient control: a loss's own gradient scale and gradient clipping, applied to that loss's
contribution to the trained parameters' gradient only. Every registered loss accepts both options beside
`weight`:

- `grad_scale: s` (a number or a schedule mapping, as `weight`; > 0): the loss enters the total as
  s * C + (1 - s) * C.detach(), with C its weighted term, so its value (logged and in `loss/total`) and its
  weight are unchanged while the gradient it sends anywhere is multiplied by s.
- `grad_clip: c` (a number > 0): the gradient g_i the loss contributes to one optimizer step (of its weighted,
  scaled term, over every trainable parameter) is clipped to global L2 norm c before the other losses'
  gradients are added:  grad = g_i min(1, c / ||g_i||) + sum_j g_j  (j the losses without grad_clip).

What is clipped is the step's whole contribution of the loss, not each micro-batch's: under gradient
accumulation (train/loop.py) g_i is the sum of the loss's gradients over the step's micro-batches, which is its
gradient on the step's whole batch, so a run with accumulation clips what a run without it clips. Under DDP
g_i is averaged over the processes as DDP averages every gradient before it is clipped: the clipping is
global (every process clips the same gradient, the one one process would compute on the global batch), at the
price of one all-reduce of a parameter-sized vector per clipped loss and step. A step's global
`distill.train.grad_clip` then clips the sum as before.

Mechanics: each forward pass records the clipped losses' live terms (`GradientControl.term`); the backward
pass (`backward`) takes each one's gradient over the trainable parameters with `torch.autograd.grad` (one
extra backward pass per clipped loss, and one parameter-sized buffer each) and backpropagates the total minus
those terms as usual; after the step's last pass, `finish` clips the buffers and adds them to the parameters'
gradients. Subtracting the term keeps the graph: the gradient into the term is exactly 1 - 1 = 0, so every
parameter it reaches still gets a (zero) gradient and DDP's hooks fire for parameters only this loss uses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from vldistill.losses.schedules import Schedule, parse_schedule

GRADIENT_KEYS = ("grad_scale", "grad_clip")


def parse_gradient_options(options: dict[str, Any], where: str) -> tuple[Optional[Schedule], Optional[float]]:
    """Take `grad_scale` (a number or a schedule, every value > 0) and `grad_clip` (a number > 0) out of a
    loss's `options` (at config key `where`, e.g. distill.losses.kd); None for an option not given."""
    scale = options.pop("grad_scale", None)
    if scale is not None:
        scale = parse_schedule(scale, f"{where}.grad_scale", positive=True)
    clip = options.pop("grad_clip", None)
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"{where}.grad_clip must be a finite number > 0, got {clip!r}")
        clip = float(clip)
    return scale, clip


def scale_gradient(value: torch.Tensor, scale: float) -> torch.Tensor:
    """`value` with its gradient multiplied by `scale` and its value unchanged: s v + (1 - s) v.detach()."""
    if scale == 1.0:
        return value
    return scale * value + (1.0 - scale) * value.detach()


def clip_factor(norm: float, limit: float) -> float:
    """What clipping a gradient of L2 norm `norm` to `limit` multiplies it by: min(1, limit / norm)."""
    return limit / norm if norm > limit else 1.0


class GradientControl:
    """The losses' gradient scales (schedules) and clipping limits, and the step's gradients of the clipped losses.

    The objective passes each loss's weighted term through `term`; the training loop backpropagates each pass's
    total with `backward` and ends the step with `finish` (see the module docstring)."""

    def __init__(self, scales: Mapping[str, Schedule], limits: Mapping[str, float]) -> None:
        self.scales = dict(scales)
        self.limits = dict(limits)
        self.live: dict[str, torch.Tensor] = {}  # the last forward pass's terms of the clipped losses
        self.sums: dict[str, list[torch.Tensor]] = {}  # their gradients over the step's passes so far

    def scale_at(self, name: str, progress: float) -> float:
        """Loss `name`'s gradient scale at training `progress` (1 without grad_scale)."""
        return self.scales[name].at(progress) if name in self.scales else 1.0

    def term(self, name: str, term: torch.Tensor, progress: float) -> torch.Tensor:
        """Loss `name`'s weighted `term` as it enters the total: its gradient scaled; recorded when it is clipped."""
        term = scale_gradient(term, self.scale_at(name, progress))
        if name in self.limits:
            self.live[name] = term
        return term

    def backward(
        self, total: torch.Tensor, params: Sequence[nn.Parameter], backward: Callable[[torch.Tensor], None]
    ) -> None:
        """Backpropagate the last forward pass's `total` with `backward` (e.g. accelerator.backward), the clipped
        losses' terms taken out: their gradients over `params` (the trainable parameters) are added to the step's
        sums instead."""
        for name, term in self.live.items():
            if term.requires_grad:  # a loss reaching no trainable parameter contributes nothing
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True, materialize_grads=True)
                sums = self.sums.get(name)
                self.sums[name] = list(grads) if sums is None else [s + g for s, g in zip(sums, grads)]
                total = total - term
        self.live = {}
        backward(total)

    def finish(
        self,
        params: Sequence[nn.Parameter],
        divided: Sequence[nn.Parameter] = (),
        passes: int = 1,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda flat: flat,
    ) -> dict[str, torch.Tensor]:
        """End the step: each clipped loss's summed gradient over `params` (the same list `backward` was given;
        those in `divided` got the step's whole gradient in each of the `passes` and are divided by it, as the
        loop divides theirs), averaged over the processes by `reduce` (an all-reduce mean under DDP), clipped to
        its limit and added to the parameters' gradients. Returns `grad_norm/<loss>`, each norm before clipping."""
        divided_ids = {id(p) for p in divided}
        norms = {}
        for name, grads in self.sums.items():
            grads = [g / passes if id(p) in divided_ids else g for p, g in zip(params, grads)]
            flat = reduce(torch.cat([g.reshape(-1) for g in grads]))
            norm = torch.linalg.vector_norm(flat)
            flat = flat * clip_factor(float(norm), self.limits[name])
            for param, grad in zip(params, flat.split([p.numel() for p in params])):
                if param.grad is not None:  # None: no loss reached it, so this one's gradient there is 0
                    param.grad.add_(grad.view_as(param.grad))
            norms[f"grad_norm/{name}"] = norm.detach()
        self.sums = {}
        return norms
