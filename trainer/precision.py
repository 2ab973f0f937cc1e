"""Mixed precision with ``torch.amp``, chosen by the hardware (docs/method.md, section 9).

On CUDA, ``--amp`` autocasts to bfloat16 where the GPU computes it natively (compute capability 8.0 and later) and to
float16 with a GradScaler on older GPUs; ``--amp-dtype`` overrides. On the CPU it autocasts to bfloat16 only
where the CPU computes bfloat16 natively (x86 AVX-512-BF16 or AMX-BF16, Arm BF16): elsewhere bfloat16 is emulated
and a training step was measured at 30x its float32 time, so the run warns once and computes in float32.

``--amp-impl apex`` keeps the reference's meaning (apex O0 = full FP32): apex is initialised only when importable,
otherwise the run says so once and trains in FP32; numerics are identical either way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# CPU capability flags (torch.cpu.get_capabilities) that mean bfloat16 arithmetic in hardware.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def enable_cuda_tf32() -> None:
    """Allow TF32 for float32 matmuls and convolutions on CUDA, as the reference does.

    Uses the ``fp32_precision`` settings only: mixing them with the older ``allow_tf32`` flags makes PyTorch raise
    when another part (the clustering, which forces IEEE float32) reads or sets the precision.
    """
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512-BF16, AMX-BF16 or Arm BF16).

    Returns False where the capability query is unavailable: emulated bfloat16 is far slower than float32.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return any(bool(capabilities.get(flag, False)) for flag in _NATIVE_BF16_FLAGS)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes bfloat16 in hardware (compute capability 8.0 and later, or ROCm).

    Args:
        device: a CUDA device (without an index: the current one).

    Returns:
        False without CUDA; emulated bfloat16 (``torch.cuda.is_bf16_supported()``'s default) does not count.
    """
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass
class Precision:
    """How a run computes: the autocast dtype (None = FP32), whether a GradScaler is needed, and why.

    Attributes:
        device_type: ``cuda`` or ``cpu``.
        dtype: autocast dtype, or None for float32.
        use_scaler: a GradScaler is needed (float16 on CUDA).
        reason: one line saying how the flags and the hardware led to this choice.
    """

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool
    reason: str = ""

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context (a no-op in FP32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.amp.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for float16 on CUDA."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)

    def describe(self) -> str:
        """Short name for logs and files: ``fp32``, ``autocast bfloat16`` or ``autocast float16``."""
        return "fp32" if self.dtype is None else f"autocast {str(self.dtype).removeprefix('torch.')}"

    def to_dict(self) -> dict[str, str]:
        """The decision as plain types, stored with the run (``args.yaml``, ``extraction.json``)."""
        return {"precision": self.describe(), "precision_reason": self.reason}


def resolve_precision(amp: bool, amp_impl: str, amp_dtype: str | None, device: torch.device) -> Precision:
    """Turn ``--amp``, ``--amp-impl`` and ``--amp-dtype`` into a ``Precision``, following the hardware.

    Args:
        amp: ``--amp`` given.
        amp_impl: ``native`` or ``apex``.
        amp_dtype: ``float16``, ``bfloat16`` or None (bfloat16, except float16 on a GPU without native bfloat16).
        device: the run's device.

    Returns:
        The resolved precision. On the CPU without native bfloat16, ``--amp`` gives float32 and one warning.

    Raises:
        ValueError: unknown ``--amp-impl`` or ``--amp-dtype``, or float16 autocast on the CPU.
    """
    if not amp:
        return Precision(device.type, None, False, "no --amp")
    if amp_impl == "apex":
        found = importlib.util.find_spec("apex") is not None
        reason = f"--amp-impl apex ({'found' if found else 'not installed'}): the reference's O0 level is full FP32"
        if found:
            logger.info("%s, training in FP32", reason)
        else:
            logger.warning("%s, training in FP32", reason)
        return Precision(device.type, None, False, reason)
    if amp_impl != "native":
        raise ValueError(f"--amp-impl {amp_impl!r}: expected 'native' or 'apex'")
    if device.type != "cuda":
        amp_dtype, reason = amp_dtype or "bfloat16", "--amp on a CPU with native bfloat16"
    elif amp_dtype is None:
        native = cuda_has_native_bf16(device)
        amp_dtype = "bfloat16" if native else "float16"
        reason = f"--amp on CUDA {'with' if native else 'without'} native bfloat16"
    else:
        reason = f"--amp on CUDA with --amp-dtype {amp_dtype}"
    dtype = _DTYPES.get(amp_dtype)
    if dtype is None:
        raise ValueError(f"--amp-dtype {amp_dtype!r}: expected 'float16' or 'bfloat16'")
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("--amp with --amp-dtype float16 needs CUDA; on the CPU use --amp-dtype bfloat16 or drop --amp")
    if device.type == "cpu" and not cpu_has_native_bf16():
        reason = (
            f"--amp on a CPU without native bfloat16 (capability {torch.backends.cpu.get_cpu_capability()}): "
            "emulated bfloat16 is many times slower than float32"
        )
        logger.warning("%s; computing in float32", reason)
        return Precision(device.type, None, False, reason)
    return Precision(device.type, dtype, dtype is torch.float16 and device.type == "cuda", reason)
