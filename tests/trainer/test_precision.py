"""Precision follows the hardware: bf16 autocast on the CPU only where bf16 is native, else fp32 and one warning; on
CUDA bf16 where the GPU computes it natively, else fp16 with a gradient scaler."""

import logging
import re
from pathlib import Path

import pytest
import torch

import trainer.precision as precision_mod
from model.prefix_attention import PrefixAttention
from trainer.precision import cpu_has_native_bf16, cuda_has_native_bf16, enable_cuda_tf32, resolve_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only named: resolve_precision runs no CUDA code once the probe is replaced


@pytest.mark.parametrize(
    "capabilities, native",
    [
        ({"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"architecture": "x86_64", "avx2": True, "avx512_bf16": True}, True),
        ({"architecture": "x86_64", "avx2": True, "amx_bf16": True}, True),
        ({"architecture": "aarch64", "neon": True, "bf16": True}, True),
        ({"architecture": "aarch64", "neon": True}, False),
    ],
)
def test_the_probe_reads_the_cpu_capabilities(monkeypatch, capabilities, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu_has_native_bf16() is native


def test_without_native_bf16_amp_runs_fp32_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="trainer.precision"):
        prec = resolve_precision(True, "native", None, CPU)
    assert prec.dtype is None and not prec.use_scaler and prec.describe() == "fp32"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without native bfloat16" in warnings[0].getMessage()
    assert prec.to_dict() == {"precision": "fp32", "precision_reason": prec.reason} and "bfloat16" in prec.reason
    # an explicit --amp-dtype bfloat16 obeys the same rule
    assert resolve_precision(True, "native", "bfloat16", CPU).dtype is None


def test_with_native_bf16_amp_autocasts_to_bf16(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: True)
    prec = resolve_precision(True, "native", None, CPU)
    assert prec.dtype is torch.bfloat16 and prec.describe() == "autocast bfloat16"
    with prec.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_float16_on_the_cpu_and_unknown_values_are_errors():
    with pytest.raises(ValueError, match="--amp-dtype float16 needs CUDA"):
        resolve_precision(True, "native", "float16", CPU)
    with pytest.raises(ValueError, match="--amp-impl 'fast'"):
        resolve_precision(True, "fast", None, CPU)
    assert resolve_precision(False, "native", "float16", CPU).describe() == "fp32"


@pytest.mark.parametrize(
    "native, amp_dtype, dtype, scaler, reason",
    [
        (True, None, torch.bfloat16, False, "--amp on CUDA with native bfloat16"),
        (False, None, torch.float16, True, "--amp on CUDA without native bfloat16"),
        (True, "float16", torch.float16, True, "--amp on CUDA with --amp-dtype float16"),
        (False, "bfloat16", torch.bfloat16, False, "--amp on CUDA with --amp-dtype bfloat16"),
    ],
)
def test_on_cuda_amp_is_bf16_where_native_else_fp16_with_a_scaler(
    monkeypatch, native, amp_dtype, dtype, scaler, reason
):
    probed = []
    monkeypatch.setattr(precision_mod, "cuda_has_native_bf16", lambda device: probed.append(device) or native)
    prec = resolve_precision(True, "native", amp_dtype, CUDA)
    assert (prec.device_type, prec.dtype, prec.use_scaler, prec.reason) == ("cuda", dtype, scaler, reason)
    assert probed == ([CUDA] if amp_dtype is None else [])  # an explicit --amp-dtype needs no probe


def test_the_cuda_probe_is_false_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_has_native_bf16(CUDA) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_probe_follows_the_compute_capability():
    assert cuda_has_native_bf16(CUDA) is (torch.cuda.get_device_capability() >= (8, 0) or torch.version.hip is not None)


@pytest.mark.parametrize("native, explicit", [(False, False), (True, True)])
def test_the_cpu_attention_kernel_follows_the_precision_actually_used(monkeypatch, native, explicit):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native)
    prec = resolve_precision(True, "native", "bfloat16", CPU)
    attn = PrefixAttention(dim=64, num_heads=2)
    x = torch.randn(2, 5, 64)
    with torch.enable_grad(), prec.autocast():
        assert attn.uses_explicit_kernel(x) is explicit


def test_tf32_uses_only_the_fp32_precision_api():
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        enable_cuda_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        from utils.kmeans import kmeans

        kmeans(torch.randn(40, 8), 3, n_init=1, max_iter=5, seed=0)  # forces IEEE float32 inside, restores after
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


def test_no_module_sets_the_legacy_allow_tf32_flags():
    root = Path(__file__).resolve().parents[2]
    sources = [
        p
        for folder in ("model", "trainer", "utils", "data_loader", "benchmarks")
        for p in (root / folder).rglob("*.py")
    ]
    sources += [root / name for name in ("train.py", "extract_features.py", "SSK.py")]
    offenders = [str(p.relative_to(root)) for p in sources if re.search(r"allow_tf32\s*=", p.read_text())]
    assert offenders == []
