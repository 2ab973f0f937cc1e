"""DPAP (TransFace's dominant patch amplitude perturbation): the amplitude mix, the pixel grid, the selection, and its
place in the recognizer's step (no Partial FC call, evaluation-mode ranking by default)."""

import pytest
import torch

from model.dpap import DPAP, DPAPDraws, apply_dpap, draw_dpap, mix_amplitude
from model.recognition import FaceRecognizer, RecognitionConfig
from model.transface_vit import token_pixel_box
from utils.presets import FACE_MEAN, FACE_STD, IMAGENET_MEAN, IMAGENET_STD


def _patches(seed: int, m: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (m, 3, 9, 9), generator=torch.Generator().manual_seed(seed)).double()


def _normalised(pixels: torch.Tensor, mean=FACE_MEAN, std=FACE_STD) -> torch.Tensor:
    """The data loader's float32 ops: ToTensor (x / 255) then Normalize ((x - mean) / std)."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean_t) / std_t


def _images(batch: int = 3, side: int = 36, seed: int = 0, mean=FACE_MEAN, std=FACE_STD) -> torch.Tensor:
    pixels = torch.randint(0, 256, (batch, 3, side, side), generator=torch.Generator().manual_seed(seed))
    return _normalised(pixels, mean, std)


def _all_selected(batch: int, k: int, lam: torch.Tensor, donor_image: torch.Tensor, donor_token: torch.Tensor):
    return DPAPDraws(torch.ones(batch, dtype=torch.bool), lam, donor_image, donor_token)


def test_lambda_zero_or_donor_equal_to_source_leaves_the_patch():
    source, donor = _patches(0), _patches(1)
    torch.testing.assert_close(mix_amplitude(source, donor, torch.zeros(4)), source, rtol=0, atol=1e-9)
    torch.testing.assert_close(mix_amplitude(source, source, torch.rand(4)), source, rtol=0, atol=1e-9)


def test_lambda_one_takes_the_donor_amplitude_and_keeps_the_source_phase():
    source, donor = _patches(2), _patches(3)
    out = mix_amplitude(source, donor, torch.ones(4))
    spectrum, donor_spectrum, source_spectrum = torch.fft.fft2(out), torch.fft.fft2(donor), torch.fft.fft2(source)
    torch.testing.assert_close(spectrum.abs(), donor_spectrum.abs(), rtol=1e-9, atol=1e-8)
    # the phase of the source where the donor's amplitude (now the patch's) is non-zero; angles compared on the circle
    where = donor_spectrum.abs() > 1e-6
    turn = torch.angle(spectrum) - torch.angle(source_spectrum)
    assert torch.allclose(torch.cos(turn[where]), torch.ones(int(where.sum()), dtype=torch.float64), atol=1e-9)
    # A e^{i phi} is Hermitian for real patches, so the inverse transform is real
    rebuilt = torch.fft.ifft2(torch.polar(donor_spectrum.abs(), torch.angle(source_spectrum)))
    assert rebuilt.imag.abs().max() < 1e-9


def test_patch_mean_per_channel_mixes_the_means():
    # the DC term: mean(P') = lam mean(Q) + (1 - lam) mean(P), channel by channel
    source, donor = _patches(4), _patches(5)
    lam = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    out = mix_amplitude(source, donor, lam)
    want = lam[:, None] * donor.mean(dim=(2, 3)) + (1 - lam[:, None]) * source.mean(dim=(2, 3))
    torch.testing.assert_close(out.mean(dim=(2, 3)), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mean, std", [(FACE_MEAN, FACE_STD), (IMAGENET_MEAN, IMAGENET_STD)])
def test_lambda_zero_keeps_every_value_exactly_on_the_pixel_grid(mean, std):
    # rounding (not the release's uint8 truncation, which moves ~1 in 6 values by -1) returns the source pixels, and
    # the loader's float32 normalisation redone gives back the very same values
    images = _images(mean=mean, std=std)
    top = torch.tensor([[0, 5, 15]] * 3)
    draws = _all_selected(
        3, 3, torch.zeros(3, 3, dtype=torch.float64), torch.randint(3, (3, 3)), torch.randint(16, (3, 3))
    )
    torch.testing.assert_close(apply_dpap(images, top, draws, mean, std), images, rtol=0, atol=0)
    own = _all_selected(3, 3, torch.rand(3, 3, dtype=torch.float64), torch.arange(3)[:, None].expand(3, 3), top)
    torch.testing.assert_close(apply_dpap(images, top, own, mean, std), images, rtol=0, atol=0)


def test_perturbed_patch_is_the_rounded_clipped_mix_of_the_clean_donor():
    images = _images(batch=2)
    top = torch.tensor([[4, 9], [3, 0]])
    # sample 0's patch at token 4 takes sample 1's token-3 patch as donor, which sample 1 itself perturbs: the donor
    # is the clean one
    draws = _all_selected(
        2,
        2,
        torch.tensor([[0.6, 0.2], [0.9, 0.4]], dtype=torch.float64),
        torch.tensor([[1, 0], [0, 0]]),
        torch.tensor([[3, 7], [8, 2]]),
    )
    out = apply_dpap(images, top, draws, FACE_MEAN, FACE_STD)
    pixels = torch.round((images.double() * 0.5 + 0.5) * 255)
    rows, cols = token_pixel_box(4, grid=4)
    donor_rows, donor_cols = token_pixel_box(3, grid=4)
    source, donor = pixels[0:1, :, rows, cols], pixels[1:2, :, donor_rows, donor_cols]
    mixed = torch.round(mix_amplitude(source, donor, torch.tensor([0.6], dtype=torch.float64))).clamp(0, 255)
    torch.testing.assert_close(out[0:1, :, rows, cols], _normalised(mixed), rtol=0, atol=0)
    assert not torch.equal(out[1, :, donor_rows, donor_cols], images[1, :, donor_rows, donor_cols])
    assert out.dtype == images.dtype and out.shape == images.shape


def test_a_constructed_gate_changes_exactly_its_seven_blocks_and_nothing_else():
    torch.manual_seed(0)
    images = _images(batch=2, side=112)
    chosen = [[13, 143, 0, 7, 70, 100, 131], [1, 2, 3, 50, 60, 99, 142]]
    gate = torch.rand(2, 144) * 0.5
    for sample, tokens in enumerate(chosen):
        gate[sample, tokens] = 0.6 + torch.rand(7) * 0.4
    out = DPAP(1.0, 7, FACE_MEAN, FACE_STD, seed=3)(images, gate)
    for sample, tokens in enumerate(chosen):
        changed = (out[sample] != images[sample]).any(dim=0)
        blocks = torch.zeros(112, 112, dtype=torch.bool)
        for token in tokens:
            rows, cols = token_pixel_box(token)
            blocks[rows, cols] = True
            assert changed[rows, cols].any(), (sample, token)  # each chosen patch changed
        assert not changed[~blocks].any()  # nothing outside them (rows and columns 108-111 included)


def test_probability_zero_leaves_the_batch_and_one_perturbs_all_b_times_k_patches():
    images, gate = _images(batch=4), torch.rand(4, 16)
    torch.testing.assert_close(DPAP(0.0, 3, FACE_MEAN, FACE_STD, seed=1)(images, gate), images, rtol=0, atol=0)
    out = DPAP(1.0, 3, FACE_MEAN, FACE_STD, seed=1)(images, gate)
    moved = (out != images).any(dim=1).view(4, 4, 9, 4, 9).any(dim=(2, 4)).flatten(1)  # (B, 16) changed tokens
    assert int(moved.sum()) == 4 * 3
    assert torch.equal(moved, torch.zeros_like(moved).scatter_(1, gate.topk(3, dim=1).indices, True))


def test_draws_are_reproducible_from_seed_and_step_and_resume_exactly():
    images, gate = _images(batch=8), torch.rand(8, 16)
    first = DPAP(0.5, 2, FACE_MEAN, FACE_STD, seed=11)
    first(images, gate)
    resumed = DPAP(0.5, 2, FACE_MEAN, FACE_STD, seed=99)
    resumed.load_state_dict(first.state_dict())
    assert resumed.seed == 11 and resumed.step == 1
    torch.testing.assert_close(resumed(images, gate), first(images, gate), rtol=0, atol=0)
    # every step draws the same number of values, selected or not: the selection of step 1 does not shift step 2's
    draws = draw_dpap(8, 2, 16, 0.5, torch.Generator().manual_seed(0))
    assert draws.lam.shape == (8, 2) and draws.donor_image.max() < 8 and draws.donor_token.max() < 16


def _recognizer(**kwargs) -> FaceRecognizer:
    torch.manual_seed(0)
    cfg = RecognitionConfig(
        arch="transface_vit_t",
        img_size=36,
        patch_size=9,
        embedding_size=16,
        num_classes=6,
        sample_rate=0.5,
        drop_path=0.0,
        **kwargs,
    )
    return FaceRecognizer(cfg).train()


@pytest.mark.parametrize("release, bn_updates", [(False, 1), (True, 2)])
def test_ranking_pass_skips_partial_fc_and_runs_in_eval_mode_unless_asked(release, bn_updates):
    model = _recognizer(dpap=True, dpap_prob=1.0, dpap_patches=3, dpap_train_mode_ranking=release)
    images, labels = _images(batch=4), torch.tensor([0, 1, 2, 3])
    model(images, labels)
    assert model.partial_fc.step == 1  # the sampling step advanced once: Partial FC saw only the training forward
    assert int(model.backbone.feature[1].num_batches_tracked) == bn_updates
    assert model.backbone.training and model.dpap.step == 1


def test_recognizer_trains_on_the_perturbed_batch_ranked_by_the_clean_gate():
    model = _recognizer(dpap=True, dpap_prob=1.0, dpap_patches=3)
    images, labels = _images(batch=4), torch.tensor([0, 1, 2, 3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = images.clone()
    loss = model(batch, labels)["loss"]
    assert not torch.equal(batch, images)  # perturbed in place
    # the same step by hand: the eval-mode gate, DPAP with the same draws, then the plain loss
    twin = _recognizer()
    twin.load_state_dict({k: v for k, v in state.items() if not k.startswith("dpap.")})
    with torch.no_grad():
        gate = twin.backbone.eval().forward_with_tokens(images).gate
    twin.backbone.train()
    perturbed = DPAP(1.0, 3, FACE_MEAN, FACE_STD, seed=int(state["dpap.seed"]))(images, gate)
    assert not torch.equal(perturbed, images)
    torch.testing.assert_close(loss, twin(perturbed, labels)["loss"])


def test_dpap_and_ehsm_need_a_transface_backbone():
    with pytest.raises(ValueError, match="--dpap: TransFace backbones only"):
        FaceRecognizer(RecognitionConfig(arch="iresnet18", img_size=32, num_classes=4, dpap=True))
    with pytest.raises(ValueError, match="--dpap-prob"):
        DPAP(1.5, 7, FACE_MEAN, FACE_STD, seed=0)
