"""TransFace's DPAP, dominant patch amplitude perturbation, batched with ``torch.fft`` on the training device.

For each sample selected with probability p, each of its K highest-gated 9 x 9 patches P takes per channel the FFT
amplitude lambda |F(Q)| + (1 - lambda) |F(P)| and keeps its own phase, with lambda ~ U(0, 1) per patch and Q a random
9 x 9 patch (any grid position) of a random image of the clean batch (possibly the same image). The work is done in
pixel space: the input preset's normalisation is undone, pixels rounded to the integer grid, the perturbed patch
rounded and clipped to [0, 255], and the normalisation redone with the data loader's float32 operations, so untouched
pixels (and patches perturbed with lambda = 0) keep their exact values.

All random draws of a step (selection, lambda, donor image and position) are made on the host from a generator seeded
with ``derive_seed(seed, step, rank)`` for every sample whether selected or not, so a run resumes exactly (``seed``
and ``step`` are saved in the state dict) and the draws do not depend on the device.

Reference: DanJun6737/TransFace ``train.py`` (the DPAP step) and ``FFT.py`` (the amplitude mix), which do the same per
patch in NumPy on the host, truncating instead of rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from model.partial_fc import CounterState, derive_seed, shared_seed
from model.transface_vit import PATCH
from utils.distributed import get_rank


class DPAPDraws(NamedTuple):
    """One step's random draws for a batch of B samples and K patches each (host tensors).

    Attributes:
        selected: (B,) bool, the samples that are perturbed.
        lam: (B, K) float64 amplitude mixing weights in [0, 1).
        donor_image: (B, K) int64 batch index of each donor patch.
        donor_token: (B, K) int64 grid position (token index) of each donor patch.
    """

    selected: torch.Tensor
    lam: torch.Tensor
    donor_image: torch.Tensor
    donor_token: torch.Tensor


def draw_dpap(batch: int, patches: int, tokens: int, prob: float, generator: torch.Generator) -> DPAPDraws:
    """Draw a step's selection, lambdas and donors (always the same number of values, selected or not)."""
    selected = torch.rand(batch, generator=generator, dtype=torch.float64) < prob
    lam = torch.rand(batch, patches, generator=generator, dtype=torch.float64)
    donor_image = torch.randint(batch, (batch, patches), generator=generator)
    donor_token = torch.randint(tokens, (batch, patches), generator=generator)
    return DPAPDraws(selected, lam, donor_image, donor_token)


def mix_amplitude(source: torch.Tensor, donor: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per channel, the inverse 2-D FFT of amplitude lam |F(donor)| + (1 - lam) |F(source)| with source's phase.

    Args:
        source: (M, C, h, w) real patches.
        donor: (M, C, h, w) real patches.
        lam: (M,) mixing weights.

    Returns:
        (M, C, h, w) real patches (the mixed spectrum is Hermitian, so its inverse is real).
    """
    # real patches have Hermitian spectra, so the half spectrum of rfft2 carries everything (and so does the mix);
    # one transform of source and donor together
    spectra = torch.fft.rfft2(torch.cat([source, donor]))
    amplitudes = spectra.abs()
    count = source.shape[0]
    source_amplitude = amplitudes[:count]
    amplitude = torch.lerp(source_amplitude, amplitudes[count:], lam.to(source.dtype)[:, None, None, None])
    # the source's unit phasor e^{i arg F(P)}; arg 0 (phasor 1) where F(P) = 0, as the angle of 0 is 0
    one = torch.ones((), dtype=spectra.dtype, device=spectra.device)
    phasor = torch.where(source_amplitude > 0, spectra[:count] / source_amplitude, one)
    return torch.fft.irfft2(amplitude * phasor, s=source.shape[-2:])


def _patch_offsets(shape: torch.Size, grid: int, images_of: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) indices into a (B, C, S, S) batch of the 9 x 9 patches of ``tokens`` in ``images_of``.

    Returns:
        (N, C, 9, 9) int64 indices.
    """
    _, channels, side, _ = shape
    steps = torch.arange(PATCH, device=tokens.device)
    channel = torch.arange(channels, device=tokens.device) * side * side
    within = channel[:, None, None] + steps[None, :, None] * side + steps[None, None, :]
    corner = images_of * channels * side * side + (tokens // grid) * PATCH * side + (tokens % grid) * PATCH
    return corner[:, None, None, None] + within


def apply_dpap(
    images: torch.Tensor,
    top_tokens: torch.Tensor,
    draws: DPAPDraws,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Perturb the top tokens' patches of the selected samples (donors read before anything is written).

    Args:
        images: (B, 3, S, S) images normalised as ``(x / 255 - mean) / std``.
        top_tokens: (B, K) token indices of each sample's dominant patches (row-major 9 x 9 grid).
        draws: the step's draws (:func:`draw_dpap`).
        mean: the preset's per-channel mean.
        std: the preset's per-channel std.
        inplace: write into ``images`` (else into a copy).

    Returns:
        The perturbed batch (``images`` itself when ``inplace`` and ``images`` is contiguous), same dtype and device.
    """
    grid = images.shape[-1] // PATCH
    rows = torch.nonzero(draws.selected).squeeze(1)
    out = images if inplace else images.clone()
    if not out.is_contiguous():
        out = out.contiguous()
    if rows.numel() == 0:
        return out
    device = images.device
    patches = top_tokens.shape[1]
    rows_here = rows.to(device)
    sample = rows_here.repeat_interleave(patches)
    token = top_tokens[rows_here].reshape(-1)
    donor_image = draws.donor_image[rows].reshape(-1).to(device)
    donor_token = draws.donor_token[rows].reshape(-1).to(device)
    lam = draws.lam[rows].reshape(-1).to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    # source and donor patches in one gather from the clean batch, back to 0-255 pixels on the integer grid
    flat = _patch_offsets(images.shape, grid, torch.cat([sample, donor_image]), torch.cat([token, donor_token]))
    pixels = (
        images.reshape(-1)
        .index_select(0, flat.view(-1))
        .view(flat.shape)
        .double()
        .mul_(std_t.double())
        .add_(mean_t.double())
        .mul_(255)
        .round_()
    )
    count = sample.shape[0]
    mixed = torch.round(mix_amplitude(pixels[:count], pixels[count:], lam)).clamp_(0, 255)
    out.put_(flat[:count], ((mixed.float() / 255 - mean_t) / std_t).to(out.dtype))
    return out


class DPAP(CounterState):
    """The DPAP step with its own seeded draws (see the module docstring).

    Args:
        prob: probability p that a sample is perturbed.
        patches: K, the dominant patches perturbed per selected sample.
        mean: per-channel mean of the input preset.
        std: per-channel std of the input preset.
        seed: base seed; None draws one on rank 0 and broadcasts it.
    """

    counters = ("seed", "step")

    def __init__(
        self,
        prob: float,
        patches: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"--dpap-prob must be in [0, 1], got {prob}")
        if patches < 1:
            raise ValueError(f"--dpap-patches must be at least 1, got {patches}")
        self.prob, self.patches = float(prob), int(patches)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = shared_seed() if seed is None else int(seed)
        self.step = 0

    def extra_repr(self) -> str:
        return f"prob={self.prob}, patches={self.patches}"

    def forward(self, images: torch.Tensor, gate: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Perturb a batch given its (B, T) gate weights (from a no-grad pass), in place or in a copy; advances
        ``step``."""
        if self.patches > gate.shape[1]:
            raise ValueError(f"--dpap-patches {self.patches} exceeds the {gate.shape[1]} tokens of the backbone")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.step, get_rank()))
        self.step += 1
        draws = draw_dpap(images.shape[0], self.patches, gate.shape[1], self.prob, generator)
        top = gate.topk(self.patches, dim=1).indices
        return apply_dpap(images, top, draws, self.mean, self.std, inplace=inplace)
