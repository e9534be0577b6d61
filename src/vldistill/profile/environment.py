"""What measured figures depend on besides the code and the model: the torch version, its thread count and the CPU."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def environment() -> dict[str, object]:
    """The torch version, its intra-op thread count (it sets the order of floating-point sums, so results are
    bit-identical only at the same count, and it sets the speed) and the CPU model."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu}
