"""Measurements: peak memory, machine description, matmul peak, U-Net FLOPs."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[2]  # the repo root, where ldm_tools imports from


# ---- memory ----------------------------------------------------------------------------------


def status_kb(field: str) -> int | None:
    """A /proc/self/status field in kB (VmRSS, VmHWM, RssAnon, ...), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def side_in_fresh_process(module: str, side: str, path: Path, size: int, steps: int, threads: int | None = None) -> dict:
    """`ldm_tools.bench.<module>.measure_side(side, path, size, steps)` in a fresh Python process (so each side's
    memory is its own), optionally on `threads` torch threads: its JSON result."""
    code = (f"import json, sys, torch; from pathlib import Path; from ldm_tools.bench.{module} import measure_side; "
            + (f"torch.set_num_threads({threads}); " if threads else "")
            + "print(json.dumps(measure_side(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))")
    out = subprocess.run([sys.executable, "-c", code, side, str(path), str(size), str(steps)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_bytes() -> int | None:
    kb = status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: VmHWM on Linux (clear_refs 5), the allocator's peak on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # peak then covers the whole process lifetime; the report says "process peak"


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kb = status_kb("VmHWM")
    return None if kb is None else kb * 1024


# ---- machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# The flags that decide which kernels run: AVX2-only CPUs get fp32, AVX-512 BF16 / AMX ones a bf16 U-Net.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags(cpuinfo: str | None = None) -> str:
    """Which of SPEED_FLAGS this CPU reports (e.g. "avx2 fma"), or "none"."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return " ".join(f for f in SPEED_FLAGS if f in flags) or "none"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine(device: torch.device) -> dict[str, str]:
    from ldm.devices import cpu_has_native_bf16

    info = {
        "CPU": cpu_model(),
        "CPU flags": cpu_flags(),
        "cores visible": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
        "native bf16": str(cpu_has_native_bf16()),
        "load average at start (1/5/15 min)": load_average(),
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    return info


# ---- throughput ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 4096, seconds: float = 3.0) -> float:
    """Best sustained FLOP/s of an n x n matmul in `dtype`: the practical ceiling for that dtype here."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # first call: kernel selection, packing buffers
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def unet_flops(unet, sample: torch.Tensor, t, embeds: torch.Tensor) -> int:
    """FLOPs of one U-Net forward. PyTorch's counter has no formula for the CPU flash-attention
    kernel, so one is registered here (else attention, a large share at 512 px, counts as zero)."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _sdpa_flops
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=extra) as counter:
        unet(sample, t, encoder_hidden_states=embeds, return_dict=False)
    return counter.get_total_flops()
