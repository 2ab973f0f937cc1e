"""FaceRecognizer: the recognition method's model (embedding backbone + Partial FC), its checkpoints and DDP."""

import math
from pathlib import Path

import pytest
import torch

from cli_helpers import load_worker, run_torchrun_worker
from model.landmark import landmark_regularisation
from model.recognition import FaceRecognizer, RecognitionConfig, recognizer_from_checkpoint
from utils.checkpoint import CheckpointError

WORKER = Path(__file__).with_name("_recognizer_dist_worker.py")
worker = load_worker(WORKER)
CONFIG = dict(arch="vit_tiny", img_size=32, patch_size=16, embedding_size=16, num_classes=5, head="arcface")


def _batch(n: int = 8) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {"images": torch.randn(n, 3, 32, 32, generator=gen), "labels": torch.randint(5, (n,), generator=gen)}


def test_checkpoint_state_round_trip_holds_the_full_centres():
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG))
    state = model.checkpoint_state_dict()
    assert state["partial_fc.weight"].shape == (5, 16)
    torch.manual_seed(1)
    other = FaceRecognizer(RecognitionConfig(**CONFIG))
    other.load_checkpoint_state_dict(state)
    for key, value in other.checkpoint_state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    ckpt = {"model_config": RecognitionConfig(**CONFIG).to_dict(), "state_dict": state, "epoch": 0}
    rebuilt = recognizer_from_checkpoint(ckpt, "ckpt").eval()
    images = _batch()["images"]
    torch.testing.assert_close(rebuilt.extract_features(images), other.eval().extract_features(images))


def test_checkpoints_that_do_not_fit_are_refused_by_name():
    model = FaceRecognizer(RecognitionConfig(**CONFIG))
    state = model.checkpoint_state_dict()
    state["partial_fc.weight"] = torch.zeros(6, 16)
    with pytest.raises(CheckpointError, match=r"\(6, 16\).*\(5, 16\)"):
        model.load_checkpoint_state_dict(state)
    with pytest.raises(CheckpointError, match="not a recognition checkpoint"):
        recognizer_from_checkpoint({"model_config": {"arch": "vit_tiny"}, "state_dict": {}}, "facegcd.pth")


def test_optimizer_state_of_the_centres_round_trips():
    model = FaceRecognizer(RecognitionConfig(**CONFIG))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = _batch()
    model(batch["images"], batch["labels"])["loss"].backward()
    opt.step()
    saved = model.optimizer_state_dict(opt)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.load_optimizer_state_dict(opt2, saved)
    for (p, state), state2 in zip(opt.state.items(), opt2.state.values()):
        torch.testing.assert_close(state2["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=0)


def _grad_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


def test_clipping_scales_the_backbone_to_the_max_norm_and_leaves_the_centres():
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG))
    batch = _batch()
    model(batch["images"], batch["labels"])["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.backbone.named_parameters() if p.grad is not None}
    centres = model.partial_fc.weight.grad.clone()
    assert centres.abs().max() > 0
    total = _grad_norm(model.backbone.parameters())
    max_norm = total / 4
    model.clip_gradients(max_norm)
    # clip_grad_norm_ over the backbone alone: every gradient times max_norm / total (torch adds 1e-6 to total)
    scale = max_norm / (total + 1e-6)
    for name, p in model.backbone.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name] * scale, rtol=1e-6, atol=0, msg=name)
    assert _grad_norm(model.backbone.parameters()) == pytest.approx(max_norm, rel=1e-5)
    assert torch.equal(model.partial_fc.weight.grad, centres)  # the centres are not clipped


def test_clip_parameters_are_the_trainable_image_path():
    model = FaceRecognizer(RecognitionConfig(**CONFIG, landmark_cnn=True, landmark_regularisation=True))
    clipped = {id(p) for p in model.clip_parameters()}
    image_path = {id(p) for m in (model.backbone, model.front_end) for p in m.parameters() if p.requires_grad}
    assert clipped == image_path
    assert id(model.partial_fc.weight) not in clipped
    assert not clipped & {id(p) for p in model.reference_front_end.parameters()}  # LAFS's frozen copy


@pytest.mark.parametrize("epoch, weight", [(0, 1000.0), (28, 0.0)])
def test_lafs_loss_is_the_margin_loss_plus_the_weighted_regularisation(epoch, weight):
    # LAFS's published schedule: 1000 for epochs 0-7, 100 for 8-13, 1 for 14-20, 0.11 for 21-27, 0 from 28 on
    torch.manual_seed(0)
    cfg = RecognitionConfig(**{**CONFIG, "head": "cosface"}, landmark_cnn=True, landmark_regularisation=True)
    model = FaceRecognizer(cfg).eval()
    model.freeze_reference_landmarks()
    with torch.no_grad():  # the trained CNN moves away from its frozen copy, so the regularisation is not zero
        for p in model.front_end.cnn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    embeddings, coords = model.embed(batch["images"])
    margin = model.partial_fc(embeddings, batch["labels"])["loss"]
    reg = landmark_regularisation(coords, model.reference_front_end.landmarks(batch["images"]), 32)
    assert reg > 1e-4
    model.begin_epoch(epoch)
    out = model(batch["images"], batch["labels"])
    assert torch.equal(out["landmark_reg"], reg.detach())
    assert torch.equal(out["loss"], margin + weight * reg)


@pytest.mark.distributed
def test_two_processes_give_the_gradients_and_the_clipped_step_of_one(tmp_path):
    batch = _batch()
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG)).eval()
    before = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
    out = model(batch["images"], batch["labels"])
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.backbone.named_parameters() if p.grad is not None}
    centres = model.partial_fc.weight.grad.clone()
    clip = _grad_norm(model.backbone.parameters()) / 4  # clipping really scales
    model.clip_gradients(clip)
    torch.optim.SGD(model.parameters(), lr=worker.LR).step()
    after = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
    torch.save({**batch, "config": CONFIG, "clip": clip}, tmp_path / "batch.pt")
    run_torchrun_worker(WORKER, [tmp_path / "batch.pt", tmp_path / "out.pt"], timeout=120)
    dist = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(dist["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist["centres"], centres, rtol=1e-4, atol=1e-6)
    for name, grad in grads.items():  # DDP's mean over ranks x W = the gradient of the global mean loss (not 1/W)
        scale = float(grad.abs().max())
        torch.testing.assert_close(dist["backbone"][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # after one clipped step the replicas are bit-identical, and the step is the one of one process
    rank0, rank1 = dist["stepped"]
    assert torch.equal(rank0, rank1)
    step = after - before
    torch.testing.assert_close(rank0 - before, step, rtol=1e-3, atol=1e-4 * float(step.abs().max()))
    _assert_checkpoint_gathered_in_blocks(dist["checkpoint"])


def _assert_checkpoint_gathered_in_blocks(checkpoint: dict) -> None:
    """The worker's checkpoint_in_blocks: 5 classes on 2 ranks (2 + 3) gathered one class per rank and round."""
    for full, shards in (("centres", "centre_shards"), ("momentum", "momentum_shards")):
        # rank 0: the shards in rank order, exactly, on the CPU
        assert checkpoint[full].shape == (5, 16) and checkpoint[full].device.type == "cpu"
        assert torch.equal(checkpoint[full], checkpoint[shards]), full
    rank0, rank1 = checkpoint["ranks"]
    assert rank0 == {"holds_centres": True, "holds_momentum": True, "reloaded": True}
    assert rank1 == {"holds_centres": False, "holds_momentum": False, "reloaded": True}  # rank 1 held no full tensor


def _changed_by_one_step(model: FaceRecognizer) -> set[str]:
    """The floating-point state entries that one SGD step on a batch changes."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = _batch()
    model.train()(batch["images"], batch["labels"])["loss"].backward()
    optimizer.step()
    return {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(before[k], v)}


def test_grad_from_block_trains_only_the_later_blocks_and_the_neck():
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG, grad_from_block=11))
    changed = {k for k in _changed_by_one_step(model) if k.endswith(("weight", "bias", "token", "embed"))}
    # vit_tiny has 12 blocks: block 11, the neck and the class centres train; everything before block 11, the patch
    # embedding, the CLS token, the position embedding and the final norm stay as they were
    assert changed and all(k.startswith(("backbone.vit.blocks.11.", "backbone.neck.", "partial_fc.")) for k in changed)
    assert any(k.startswith("backbone.vit.blocks.11.") for k in changed) and "partial_fc.weight" in changed
    assert {k for k in changed if k.startswith("backbone.neck.")} == {
        "backbone.neck.0.weight",
        "backbone.neck.1.weight",
        "backbone.neck.1.bias",
    }


@pytest.mark.parametrize(
    "arch, first, message", [("iresnet18", 3, "registered ViTs only"), ("vit_tiny", 12, "0 .all blocks. to 11")]
)
def test_grad_from_block_outside_a_vit_is_refused(arch, first, message):
    with pytest.raises(ValueError, match=f"--grad-from-block {first}: .*{message}"):
        FaceRecognizer(RecognitionConfig(**{**CONFIG, "arch": arch}, grad_from_block=first))


@pytest.mark.parametrize("first", [0, 11])
def test_grad_from_block_freezes_the_landmark_cnn_below_the_first_trained_block(first):
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG, landmark_cnn=True, grad_from_block=first))
    front_end = {k for k in _changed_by_one_step(model) if k.startswith("front_end.")}
    # Part fViT from scratch learns its landmark CNN; fine-tuning from block 11 keeps the start's landmarks
    assert bool(front_end) == (first == 0)
    assert model.front_end.cnn.training == (first == 0)  # a frozen CNN keeps dropout off and BatchNorm statistics


def test_landmark_regularisation_of_a_frozen_landmark_cnn_is_refused():
    with pytest.raises(
        ValueError, match="--landmark-regularisation .* --grad-from-block 11 the landmark CNN is frozen"
    ):
        FaceRecognizer(RecognitionConfig(**CONFIG, landmark_cnn=True, landmark_regularisation=True, grad_from_block=11))
