"""The benchmark's selection logic, run on the CPU: the GPU suite's plan and its refusal without CUDA,
the CPU-flag report, and `python -m ldm.bench` pointing to the benchmark."""
import subprocess
import sys

import pytest
import torch

from ldm_tools.bench import gpu_suite, measure


def test_gpu_plan_covers_attention_layout_and_compile_per_shape():
    configs = gpu_suite.plan(xformers=True)
    assert {(c.family, c.size) for c in configs} == {("sd15", 512), ("sdxl", 1024)}
    sd15 = [c for c in configs if c.family == "sd15"]
    assert {c.attention for c in sd15} == {"sdpa", "xformers"}
    assert {c.channels_last for c in sd15} == {True, False}
    assert any(c.compile for c in sd15)
    assert len({c.name for c in sd15}) == len(sd15)  # every row of the table is distinguishable


def test_gpu_plan_without_xformers_or_compile():
    configs = gpu_suite.plan(("sd15",), xformers=False, compile=False)
    assert all(c.attention == "sdpa" and not c.compile for c in configs)
    with pytest.raises(ValueError, match="sd3"):
        gpu_suite.plan(("sd3",), xformers=False)


def test_gpu_suite_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA"):
        gpu_suite.require_cuda(torch.device("cuda"))
    with pytest.raises(SystemExit):
        gpu_suite.require_cuda(torch.device("cpu"))


def test_cpu_flags_report_what_decides_the_kernels():
    info = "processor : 0\nflags : fpu sse avx avx2 fma avx512f avx512_bf16 amx_tile\n"
    assert measure.cpu_flags(info) == "avx2 fma avx512f avx512_bf16 amx_tile"
    assert measure.cpu_flags("flags : fpu sse\n") == "none"


def test_ldm_bench_points_to_the_tools():
    out = subprocess.run([sys.executable, "-m", "ldm.bench"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "python -m ldm_tools.bench" in out.stderr


def test_encode_pagein_variants_on_the_tiny_model(base_model):
    """--encode-pagein's variants differ in the way they say: the encoder a private copy, or left mapped. (How much
    the first read pages in shows on real sizes only: loading a file this small already faults most of it in.)"""
    from ldm_tools.bench import encode_pagein

    private, mapped = (encode_pagein.measure_side(v, base_model, 64) for v in ("private", "mapped"))
    assert private["mapped_bytes"] == 0
    assert mapped["mapped_bytes"] == mapped["encoder_bytes"] > 0
    assert "| mapped |" in encode_pagein.report([private, mapped], "tiny")
