"""One timed run of the quickstart's training step, for `benchmarks.quickstart_cost` (run as a subprocess).

Run as ``python benchmarks/quickstart_worker.py '<json settings>'`` with the source tree to time first on
``PYTHONPATH``: it imports only ``model``, ``data_loader`` and ``trainer.optim``, which every checkout has, so the same
file times the current tree and an older one. It builds the FaceGCD model and the real ``synthfaces_quick`` training
loader, runs ``warmup + steps`` training steps as the training loop does (loader, forward, loss, backward, gradient
clipping, the optimiser from ``create_optimizer``) and prints one JSON line: the wall seconds of each step, the loss of
each step and the gradient norm of the first step, so that two trees can be checked to compute the same thing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import model as model_package
from data_loader import build_gcd_datasets
from model import ModelConfig, build_facegcd
from trainer.optim import create_optimizer


def run(settings: dict) -> dict:
    """Time the steps described by ``settings`` (model, batch, lr, weight_decay, clip, data, threads, steps)."""
    torch.set_num_threads(settings["threads"])
    model_config = settings["model"]
    datasets = build_gcd_datasets("synthfaces_quick", settings["data"], image_size=model_config["img_size"])
    torch.manual_seed(0)
    model = build_facegcd(ModelConfig(**model_config)).train()
    groups = model.get_params_groups(settings["weight_decay"])
    optimizer = create_optimizer(groups, opt="adamw", lr=settings["lr"], weight_decay=settings["weight_decay"])
    loader = DataLoader(
        datasets.train,
        batch_size=settings["batch"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    batches = iter(loader)
    times, losses, grad_norms = [], [], []
    if settings["warmup"] < 1:
        raise ValueError("warmup must be >= 1 (the first step also records the gradient norm)")
    for _ in range(settings["warmup"] + settings["steps"]):
        start = time.perf_counter()
        inputs = model.batch_inputs(next(batches), torch.device("cpu"))
        loss = model(*inputs)["loss"]
        loss.backward()
        if not grad_norms:  # the first (untimed) step: the gradient norm, to compare trees
            grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
            grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        model.clip_gradients(settings["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "times": times[settings["warmup"] :],
        "losses": losses,
        "grad_norm": grad_norms[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "steps_per_epoch": len(loader),
        "source": str(Path(model_package.__file__).resolve().parent.parent),
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
