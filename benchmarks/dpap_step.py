"""DPAP speed: the batched device-side step against the obvious per-patch NumPy FFT through host memory, and the cost of
a TransFace training step with and without DPAP and EHSM.

Part 1 draws one step's selection, lambdas and donors (``model.dpap.draw_dpap``) and the top-K tokens of a random gate
for a batch of face-preset images, then perturbs the batch twice: with ``model.dpap.apply_dpap`` (all selected patches
at once with ``torch.fft`` on ``--device``, in place as in training) and with the obvious implementation the release
uses (the batch copied to host memory as 0-255 pixels, then for every selected sample and each of its K patches, per
channel, a NumPy ``fft2`` / ``ifft2`` written back, and the batch copied back and renormalised). The reference rounds
and reads its donors from the clean batch, as ours does, so the two outputs must be identical (asserted). Reported: the
shortest time of each over ``--repeats`` runs (``benchmarks.common.timed``) and their ratio.

Part 2 times full training steps (forward, backward, AdamW step) of a TransFace recognizer (``--arch``) at 112 px with
ArcFace over ``--classes`` centres in four arms: plain, DPAP, EHSM, both; and, for DPAP, the two pieces it adds: the
no-grad ranking pass of the backbone and the perturbation itself.

Usage (from the repository root):
    python -m benchmarks.dpap_step --threads 1 --output dpap_step.json
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import torch

from benchmarks.common import add_common_args, environment, resolve_device, save_results, setup, timed
from model.dpap import DPAPDraws, apply_dpap, draw_dpap
from model.recognition import FaceRecognizer, RecognitionConfig
from model.transface_vit import PATCH, TRANSFACE_ARCHS
from utils.presets import FACE_MEAN, FACE_STD

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="DPAP batch B (default: %(default)s)")
    parser.add_argument("--prob", type=float, default=0.2, help="DPAP selection probability (default: %(default)s)")
    parser.add_argument("--patches", type=int, default=7, help="DPAP patches per sample K (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=21, help="timed runs of each DPAP version (default: %(default)s)"
    )
    parser.add_argument(
        "--arch",
        choices=TRANSFACE_ARCHS,
        default="transface_vit_s",
        help="training-step backbone (default: %(default)s)",
    )
    parser.add_argument("--step-batch", type=int, default=32, help="training-step batch (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per arm (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="classifier centres (default: %(default)s)")
    parser.add_argument("--skip-steps", action="store_true", help="time the DPAP step only (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="data and draw seed (default: %(default)s)")
    add_common_args(parser, threads_default=1)
    return parser


def face_batch(batch: int, side: int, seed: int, device: torch.device) -> torch.Tensor:
    """Random 0-255 pixels normalised as the face preset's loader does: (x / 255 - 0.5) / 0.5, float32."""
    pixels = torch.randint(0, 256, (batch, 3, side, side), generator=torch.Generator().manual_seed(seed))
    return ((pixels.float() / 255 - 0.5) / 0.5).to(device)


def numpy_dpap(images: torch.Tensor, top_tokens: torch.Tensor, draws: DPAPDraws) -> torch.Tensor:
    """The obvious DPAP: host copy, Python loops over samples, patches and channels, one NumPy FFT pair per channel."""
    device = images.device
    pixels = np.rint((images.cpu().numpy().astype(np.float64) * 0.5 + 0.5) * 255).transpose(0, 2, 3, 1)  # BHWC
    clean = pixels.copy()
    grid = images.shape[-1] // PATCH
    top, lam = top_tokens.cpu().numpy(), draws.lam.numpy()
    donor_image, donor_token = draws.donor_image.numpy(), draws.donor_token.numpy()
    for i in np.nonzero(draws.selected.numpy())[0]:
        for k in range(top.shape[1]):
            row, col = divmod(int(top[i, k]), grid)
            drow, dcol = divmod(int(donor_token[i, k]), grid)
            source = pixels[i, PATCH * row : PATCH * row + PATCH, PATCH * col : PATCH * col + PATCH, :]
            donor = clean[donor_image[i, k], PATCH * drow : PATCH * drow + PATCH, PATCH * dcol : PATCH * dcol + PATCH]
            out = np.empty_like(source)
            for c in range(3):
                spectrum = np.fft.fft2(source[:, :, c])
                amplitude = lam[i, k] * np.abs(np.fft.fft2(donor[:, :, c])) + (1 - lam[i, k]) * np.abs(spectrum)
                out[:, :, c] = np.real(np.fft.ifft2(amplitude * np.exp(1j * np.angle(spectrum))))
            pixels[i, PATCH * row : PATCH * row + PATCH, PATCH * col : PATCH * col + PATCH, :] = np.clip(
                np.rint(out), 0, 255
            )
    back = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device)
    return (back.float() / 255 - 0.5) / 0.5


def dpap_speed(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 1: batched vs per-patch NumPy DPAP on the same batch and draws."""
    images = face_batch(args.batch_size, 112, args.seed, device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    gate = torch.rand(args.batch_size, 144, generator=gen).to(device)
    draws = draw_dpap(args.batch_size, args.patches, 144, args.prob, gen)
    top = gate.topk(args.patches, dim=1).indices
    copies = iter([images.clone() for _ in range(args.repeats)])  # perturbed in place, as in training
    batched, batched_s = timed(
        lambda: apply_dpap(next(copies), top, draws, FACE_MEAN, FACE_STD, inplace=True), device, args.repeats
    )
    reference, reference_s = timed(lambda: numpy_dpap(images, top, draws), device, args.repeats)
    if not torch.equal(batched, reference):
        raise AssertionError("batched DPAP and the per-patch NumPy reference differ")
    patches = int(draws.selected.sum()) * args.patches
    logger.info("DPAP on %d patches: batched %.4f s, per-patch NumPy %.4f s", patches, batched_s, reference_s)
    return {
        "patches_perturbed": patches,
        "batched_s": batched_s,
        "numpy_per_patch_s": reference_s,
        "speedup": reference_s / batched_s,
        "identical": True,
    }


def step_costs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 2: training-step time of the four arms, and the two pieces DPAP adds."""
    images = face_batch(args.step_batch, 112, args.seed, device)
    labels = torch.randint(args.classes, (args.step_batch,), generator=torch.Generator().manual_seed(args.seed))
    out: dict[str, Any] = {}
    for arm, dpap, ehsm in (
        ("plain", False, False),
        ("dpap", True, False),
        ("ehsm", False, True),
        ("both", True, True),
    ):
        out.update(_time_arm(args, device, arm, images, labels.to(device), dpap=dpap, ehsm=ehsm))
    return out


def _time_arm(
    args: argparse.Namespace,
    device: torch.device,
    arm: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    dpap: bool,
    ehsm: bool,
) -> dict[str, float]:
    """Shortest step time of one arm (after one untimed step); with DPAP also its ranking pass and perturbation."""
    torch.manual_seed(args.seed)
    cfg = RecognitionConfig(
        arch=args.arch, patch_size=PATCH, num_classes=args.classes, weight_decay_on="all", dpap=dpap, ehsm=ehsm
    )
    model = FaceRecognizer(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        model(images.clone(), labels)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, AdamW state)
    out = {f"{arm}_step_s": timed(step, device, args.steps)[1]}
    logger.info("%s: %s step %.3f s", args.arch, arm, out[f"{arm}_step_s"])
    if dpap:
        gate, out[f"{arm}_ranking_pass_s"] = timed(lambda: model.dominant_patch_gate(images), device, args.steps)
        out[f"{arm}_perturbation_s"] = timed(lambda: model.dpap(images.clone(), gate), device, args.steps)[1]
    return out


def main(args: argparse.Namespace) -> int:
    setup(args.threads)
    device = resolve_device(args.device)
    results: dict[str, Any] = {"dpap": dpap_speed(args, device)}
    if not args.skip_steps:
        results["training_step"] = step_costs(args, device)
    env = environment(device, {"numpy": np.__version__})
    save_results({"args": vars(args), "environment": env, "results": results}, args.output, logger)
    return 0


if __name__ == "__main__":
    from benchmarks.common import cli_main

    raise SystemExit(cli_main(get_args_parser(), main))
