"""Mixed precision with ``torch.amp`` (method spec section 8).

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


@dataclass
class Precision:
    """How a run computes: the autocast dtype (None = FP32) and whether a GradScaler is needed."""

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context (a no-op in FP32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.amp.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for float16 on CUDA."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)

    def describe(self) -> str:
        """Human-readable summary for the log."""
        return "fp32" if self.dtype is None else f"autocast {str(self.dtype).removeprefix('torch.')}"


def resolve_precision(amp: bool, amp_impl: str, amp_dtype: str, device: torch.device) -> Precision:
    """Turn ``--amp``, ``--amp-impl`` and ``--amp-dtype`` into a ``Precision``.

    Args:
        amp: ``--amp`` given.
        amp_impl: ``native`` or ``apex``.
        amp_dtype: ``float16`` or ``bfloat16``.
        device: the run's device.

    Returns:
        The resolved precision. Raises ValueError for float16 autocast on CPU.
    """
    if not amp:
        return Precision(device.type, None, False)
    if amp_impl == "apex":
        if importlib.util.find_spec("apex") is not None:
            logger.info("--amp-impl apex: apex found; the reference's O0 opt level is full FP32, training in FP32")
        else:
            logger.warning("--amp-impl apex: apex is not installed; its O0 setting is full FP32, training in FP32")
        return Precision(device.type, None, False)
    if amp_impl != "native":
        raise ValueError(f"--amp-impl {amp_impl!r}: expected 'native' or 'apex'")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp_dtype)
    if dtype is None:
        raise ValueError(f"--amp-dtype {amp_dtype!r}: expected 'float16' or 'bfloat16'")
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("--amp with --amp-dtype float16 needs CUDA; on the CPU use --amp-dtype bfloat16 or drop --amp")
    return Precision(device.type, dtype, dtype is torch.float16 and device.type == "cuda")
