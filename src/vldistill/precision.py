"""bfloat16 on the CPU: whether this CPU runs it faster than fp32 (measured by a short probe), the warning a bf16
run logs when it does not, and the autocast a bf16 training step runs under.

Why bf16 can be slower on a CPU (measured on a 2-core KVM Xeon, README "bf16 on CPU"): without bfloat16
instructions (AVX512-BF16 or AMX) oneDNN emulates bf16 matrix products, several times slower than MKL's fp32
ones; elementwise ops get faster (half the bytes) but are a small part of a step. PyTorch's flash-attention
kernel is worse still in bf16 backward, so a bf16 training step on the CPU runs attention with the math kernel.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

PROBE_SEQUENCES, PROBE_TOKENS, PROBE_WIDTH, PROBE_HEADS = 64, 16, 128, 4
PROBE_TRIALS = 5


def native_bf16_cpu() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX tiles), as PyTorch detects them."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@contextlib.contextmanager
def training_autocast(device_type: str, enabled: bool) -> Iterator[None]:
    """bfloat16 autocast on `device_type` when `enabled` (else nothing); on the CPU attention then uses the
    math kernel, whose bf16 backward measured 3-5x faster than the flash kernel's at the demo's sizes."""
    if not enabled:
        yield
        return
    with torch.autocast(device_type, dtype=torch.bfloat16), contextlib.ExitStack() as stack:
        if device_type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


class _ProbeBlock(nn.Module):
    """A pre-norm transformer block (attention + GELU MLP) like the towers' layers, for timing only."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output on (sequences, tokens, width) input."""
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.out(attended)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


@dataclass(frozen=True)
class Bf16Probe:
    """Median milliseconds of the probe in fp32 and in bf16, and what was timed."""

    fp32_ms: float
    bf16_ms: float
    what: str

    @property
    def slowdown(self) -> float:
        """bf16 time over fp32 time (above 1: bf16 is slower)."""
        return self.bf16_ms / self.fp32_ms

    def describe(self) -> str:
        """The figure and where it comes from, for a log line."""
        return (
            f"{self.slowdown:.1f}x the fp32 time in a probe at the start of this run ({self.what}, median of "
            f"{PROBE_TRIALS} interleaved trials: {self.fp32_ms:.1f} ms fp32, {self.bf16_ms:.1f} ms bf16)"
        )


@functools.cache
def probe_cpu_bf16(training: bool) -> Bf16Probe:
    """Time a transformer block on the CPU in fp32 and in bf16, trials interleaved (the process's threads; the
    global random state left as it was): forward and backward under `training_autocast` when `training` (a
    student's step), else a forward in inference mode with bf16 weights (a teacher's, see TeacherEnsemble).
    Measured once per process and kind."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = _ProbeBlock(PROBE_WIDTH, PROBE_HEADS)
        x = torch.randn(PROBE_SEQUENCES, PROBE_TOKENS, PROBE_WIDTH)
    shape = f"a {PROBE_WIDTH}-wide transformer block on {PROBE_SEQUENCES}x{PROBE_TOKENS} tokens"
    if training:
        def run(bf16: bool) -> None:
            with training_autocast("cpu", bf16):
                loss = block(x).square().mean()
            loss.backward()
            block.zero_grad(set_to_none=True)

        what = f"forward and backward of {shape}, bf16 under autocast"
    else:
        bf16_block, bf16_x = copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16)

        def run(bf16: bool) -> None:
            with torch.inference_mode():
                if bf16:
                    bf16_block(bf16_x)
                else:
                    block(x)

        what = f"inference forward of {shape}, bf16 weights"
    times: dict[bool, list[float]] = {False: [], True: []}
    for trial in range(PROBE_TRIALS + 1):  # the first round warms up
        for bf16 in (False, True):
            start = time.perf_counter()
            run(bf16)
            if trial:
                times[bf16].append(1000 * (time.perf_counter() - start))
    return Bf16Probe(statistics.median(times[False]), statistics.median(times[True]), what)


def report_cpu_bf16(role: str, training: bool) -> Bf16Probe:
    """Probe bf16 on this CPU (see `probe_cpu_bf16`) and log what it found for `role` (what runs in bf16, e.g.
    "distill.train.precision bf16"): a warning with the measured slowdown when bf16 is slower, else an info line."""
    probe = probe_cpu_bf16(training)
    if probe.slowdown > 1:
        native = "" if native_bf16_cpu() else (
            "; this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so bf16 matrix products are emulated"
        )
        logger.warning(
            f"{role} on the CPU is slower than fp32 here: bf16 took {probe.describe()}{native}. "
            "Use fp32 on this machine (benchmarks/bf16_step.py measures whole steps)"
        )
    else:
        logger.info(f"{role} on the CPU: bf16 took {probe.describe()}")
    return probe
