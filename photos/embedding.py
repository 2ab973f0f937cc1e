"""Aligned faces to embeddings with a trained checkpoint of any registered method that embeds images.

The model is rebuilt through the method registry (``trainer.methods``) as ``extract_features.py`` and ``verify.py``
rebuild it, and images pass the evaluation input of the checkpoint's preset (``trainer.engine.uint8_embedder``). Each
face and its horizontal flip are embedded and the two embeddings summed, then L2-normalised, as the verification
protocols do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from trainer.engine import uint8_embedder
from trainer.methods import method_of_checkpoint
from trainer.precision import resolve_precision
from utils.checkpoint import load_checkpoint
from utils.presets import GCD_PRESET


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class FaceEmbedder:
    """A checkpoint's model with its input settings.

    Attributes:
        model: the model in eval mode on ``device`` (its ``forward_features``).
        image_size: its input side.
        preset: its input preset (``gcd`` or ``face``).
        checkpoint: the checkpoint file.
        digest: SHA-256 of the checkpoint file (names the embeddings it made).
        device: where the model runs.
    """

    model: torch.nn.Module
    image_size: int
    preset: str
    checkpoint: str
    digest: str
    device: torch.device

    @torch.no_grad()
    def embed(self, faces: Sequence[Image.Image], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings (image + flip summed) of aligned RGB faces, on the CPU."""
        embed = uint8_embedder(
            self.model, self.image_size, self.device, resolve_precision(False, "native", None, self.device), self.preset
        )
        out = []
        for start in tqdm(range(0, len(faces), batch_size), desc="embed faces", unit="batch", disable=not progress):
            batch = torch.from_numpy(
                np.stack([np.asarray(f.convert("RGB")) for f in faces[start : start + batch_size]])
            )
            batch = batch.permute(0, 3, 1, 2).contiguous()
            out.append((embed(batch) + embed(batch.flip(-1))).float().cpu())
        if not out:
            return torch.zeros(0, 0)
        return torch.nn.functional.normalize(torch.cat(out), dim=1)


def load_embedder(path: str | Path, *, weights_only: bool, device: torch.device) -> FaceEmbedder:
    """The embedder of a training checkpoint.

    Raises:
        CheckpointError: an unreadable file, or a run whose method does not embed images (a DINO pretraining run).
    """
    ckpt = load_checkpoint(path, weights_only=weights_only, mmap=True)
    model = method_of_checkpoint(ckpt, path).load_for_embedding(ckpt, path, weights_only=weights_only)
    preset = (ckpt.get("data_config") or {}).get("input_preset", GCD_PRESET)
    return FaceEmbedder(model.to(device).eval(), int(model.cfg.img_size), preset, str(path), file_digest(path), device)
