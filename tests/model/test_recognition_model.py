"""FaceRecognizer: the recognition method's model (embedding backbone + Partial FC), its checkpoints and DDP."""

from pathlib import Path

import pytest
import torch

from cli_helpers import run_torchrun_worker
from model.recognition import FaceRecognizer, RecognitionConfig, recognizer_from_checkpoint
from utils.checkpoint import CheckpointError

WORKER = Path(__file__).with_name("_recognizer_dist_worker.py")
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


@pytest.mark.distributed
def test_two_processes_give_the_backbone_and_centre_gradients_of_one(tmp_path):
    batch = _batch()
    torch.manual_seed(0)
    model = FaceRecognizer(RecognitionConfig(**CONFIG)).eval()
    out = model(batch["images"], batch["labels"])
    out["loss"].backward()
    torch.save({**batch, "config": CONFIG}, tmp_path / "batch.pt")
    run_torchrun_worker(WORKER, [tmp_path / "batch.pt", tmp_path / "out.pt"], timeout=120)
    dist = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(dist["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist["centres"], model.partial_fc.weight.grad, rtol=1e-4, atol=1e-6)
    for name, p in model.backbone.named_parameters():
        if p.grad is not None:  # DDP's mean over ranks x W = the gradient of the global mean loss (not 1/W of it)
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(dist["backbone"][name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
