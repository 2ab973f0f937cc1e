"""Margin heads: logits and losses against values worked by hand from the formulas, gradients, buffers, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.margin_heads import MARGIN_HEADS, AdaFace, CombinedMargin, GBCosFace, build_margin_head

S = 64.0


def _cos(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- combined margin


def test_arcface_logits_by_hand():
    head = build_margin_head("arcface")
    cosine = _cos([[0.5, 0.2, -0.3], [0.8, 1.0, -1.0], [0.4, 0.9, -1.0], [0.1, -1.0, 0.7]])
    labels = torch.tensor([0, 1, -1, 1])
    logits = head(cosine, labels)
    expected = S * cosine  # non-target columns: s * cos
    # row 0: theta = acos(0.5) = pi/3 = 1.047198; cos(1.047198 + 0.5) = cos(1.547198) = 0.0235966 -> x64 = 1.510181
    expected[0, 0] = 1.510181
    # row 1: cos = 1 -> theta = 0; cos(0 + 0.5) = 0.8775826 -> x64 = 56.165284
    expected[1, 1] = 56.165284
    # row 2: target held by another rank (-1): no margin anywhere
    # row 3: cos = -1 -> theta = pi, phi = pi + 0.5 > pi: plain cos(pi + 0.5) = -cos(0.5) = -0.8775826 (arcface_torch)
    #        -> x64 = -56.165284
    expected[3, 1] = -56.165284
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4)


def test_cosface_sphereface_combined_logits_by_hand():
    cosine = _cos([[0.5, 0.3], [-1.0, 0.9]])
    labels = torch.tensor([0, 0])
    # CosFace (1, 0, 0.4): 0.5 - 0.4 = 0.1 -> 6.4; -1 - 0.4 = -1.4 -> -89.6
    cosface = build_margin_head("cosface")(cosine, labels)
    assert torch.allclose(cosface[:, 0], torch.tensor([6.4, -89.6]), atol=1e-4)
    # SphereFace (m1 = 1.35): cos(1.35 * pi/3) = cos(1.4137167) = 0.1564345 -> 10.011806
    # cos = -1: phi = 1.35 pi = 4.2411501 in [pi, 2 pi), k = 1: -cos(4.2411501) - 2 = 0.4539905 - 2 = -1.5460095
    #           -> -98.944608
    sphere = build_margin_head("sphereface")(cosine, labels)
    assert torch.allclose(sphere[:, 0], torch.tensor([10.011806, -98.944608]), atol=1e-4)
    # CM1 (1, 0.3, 0.2): cos(pi/3 + 0.3) - 0.2 = cos(1.3471976) - 0.2 = 0.2217402 - 0.2 = 0.0217402 -> 1.391375
    combined = build_margin_head("combined")(cosine, labels)
    assert combined[0, 0].item() == pytest.approx(1.391375, abs=1e-4)
    for logits in (cosface, sphere, combined):
        assert torch.allclose(logits[:, 1], S * cosine[:, 1])


@pytest.mark.parametrize(
    "m1, m2, m3", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.7, 0.0, 0.0), (1.0, 0.3, 0.2), (2.5, 0.6, 0.1)]
)
def test_monotone_option_is_continuous_and_monotone_in_theta(m1, m2, m3):
    head = CombinedMargin(m1=m1, m2=m2, m3=m3, monotone_past_pi=True)
    cos = torch.cos(torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)).float()
    psi = head.margin_cosine(cos).double()
    steps = psi[1:] - psi[:-1]
    assert (steps <= 1e-6).all(), f"psi increases by {steps.max():.3g} somewhere on [0, pi]"
    assert steps.abs().max() < 0.01  # continuous: no jump at phi = k pi on this grid (step pi/20000)
    # where phi = m1 theta + m2 stays below pi, psi is the plain formula (theta of the float32 cosines)
    theta = torch.acos(cos.double())
    inside = m1 * theta + m2 <= math.pi
    assert torch.allclose(psi[inside], torch.cos(m1 * theta[inside] + m2) - m3, atol=1e-5)


def test_arcface_monotone_extension_at_theta_3():
    # theta = 3 rad: phi = 3.5 > pi; plain cos(3.5) = -0.9364567 would exceed psi(pi - 0.5) = -1;
    # the extension gives -cos(3.5) - 2 = 0.9364567 - 2 = -1.0635433
    head = build_margin_head("arcface", monotone_past_pi=1.0)  # as --head-args monotone_past_pi=1 passes it
    value = head.margin_cosine(torch.tensor([math.cos(3.0)]))
    assert value.item() == pytest.approx(-1.0635433, abs=1e-5)
    assert build_margin_head("arcface").margin_cosine(torch.tensor([math.cos(3.0)])).item() == pytest.approx(
        -0.9364567, abs=1e-5
    )


def test_past_pi_arcface_torch_default_and_monotone_option_by_hand():
    # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), with sin(theta) = sqrt(1 - cos^2) (theta in [0, pi]).
    # ArcFace, cos = -0.95: theta = acos(-0.95) = 2.8240322, phi = 3.3240322 > pi. sin = sqrt(0.0975) = 0.3122499,
    #   cos(0.5) = 0.8775826, sin(0.5) = 0.4794255: cos(phi) = -0.8337034 - 0.1497006 = -0.9834040 -> x64 = -62.937857;
    #   monotone (k = 1): -cos(phi) - 2 = -1.0165960 -> x64 = -65.062143.
    # Combined (1, 0.3, 0.2), cos = -0.99: theta = 3.0000532, phi = 3.3000532 > pi. sin = sqrt(0.0199) = 0.1410674,
    #   cos(0.3) = 0.9553365, sin(0.3) = 0.2955202: cos(phi) = -0.9457831 - 0.0416883 = -0.9874714;
    #   minus 0.2: -1.1874714 -> x64 = -75.998168; monotone: 0.9874714 - 2 - 0.2 = -1.2125286 -> x64 = -77.601832.
    # CosFace never passes pi (phi = theta): cos = -1 gives -1 - 0.4 = -1.4 -> x64 = -89.6 with or without the option.
    cases = [("arcface", -0.95, -62.937857, -65.062143), ("combined", -0.99, -75.998168, -77.601832)]
    cases.append(("cosface", -1.0, -89.6, -89.6))
    labels = torch.tensor([0])
    for name, cos, plain, monotone in cases:
        cosine = _cos([[cos, 0.1]])
        assert build_margin_head(name)(cosine, labels)[0, 0].item() == pytest.approx(plain, abs=1e-4)
        assert build_margin_head(name, monotone_past_pi=1)(cosine, labels)[0, 0].item() == pytest.approx(
            monotone, abs=1e-4
        )


def test_default_target_is_plain_cos_everywhere():
    # arcface_torch: cos(m1 theta + m2) - m3 on all of [0, pi], rising again past phi = pi.
    head = build_margin_head("arcface")
    cos = torch.cos(torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)).float()
    theta = torch.acos(cos.double())
    assert torch.allclose(head.margin_cosine(cos).double(), torch.cos(theta + 0.5), atol=1e-5)


def test_combined_margin_gradient_is_straight_through():
    head = build_margin_head("arcface")
    cosine = _cos([[0.5, 0.2, -0.3], [1.0, -1.0, 0.0], [-1.0, 0.99, 1.0]]).requires_grad_(True)
    labels = torch.tensor([0, 0, 0])
    weights = torch.arange(1.0, 10.0).view(3, 3)
    (head(cosine, labels) * weights).sum().backward()
    # d logit / d cos = s for every column, the target too (margin added as a constant), at cos = +-1 as well
    assert torch.isfinite(cosine.grad).all()
    assert torch.allclose(cosine.grad, S * weights)


def test_interclass_filtering_zeroes_noisy_negatives():
    head = build_margin_head("arcface", interclass_filtering_threshold=0.4)
    cosine = _cos([[0.3, 0.5, 0.35, 0.41], [0.9, 0.6, 0.2, -0.5], [0.45, 0.1, 0.6, 0.39]]).requires_grad_(True)
    labels = torch.tensor([0, 0, -1])
    logits = head(cosine, labels)
    expected = S * cosine.detach()
    expected[0, 1] = expected[0, 3] = 0.0  # negatives 0.5, 0.41 > 0.4 -> logit 0
    expected[1, 1] = 0.0  # negative 0.6 > 0.4; the target 0.9 is never filtered
    expected[2, 0] = expected[2, 2] = 0.0  # no target here: every cos > 0.4 is filtered
    # targets: cos(acos(0.3) + 0.5) = cos(1.2661037 + 0.5) = cos(1.7661037) = -0.1940680 -> -12.420355
    #          cos(acos(0.9) + 0.5) = cos(0.4510268 + 0.5) = cos(0.9510268) = 0.5808456 -> 37.174244
    expected[0, 0], expected[1, 0] = -12.420355, 37.174244
    assert torch.allclose(logits, expected, atol=1e-4)
    logits.sum().backward()
    filtered = expected == 0.0
    assert (cosine.grad[filtered] == 0).all() and torch.allclose(cosine.grad[~filtered], torch.tensor(S))


@pytest.mark.parametrize("name", ["arcface", "sphereface", "adaface"])
def test_autocast_and_half_inputs_give_float32(name):
    head = build_margin_head(name)
    cosine = _cos([[0.5, -1.0, 1.0], [1.0, 0.25, -0.75]])
    labels = torch.tensor([0, 0])
    norms = torch.tensor([18.0, 25.0])
    reference = build_margin_head(name)(cosine, labels, norms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(cosine.bfloat16(), labels, norms.bfloat16())
    assert out.dtype == torch.float32
    # 0.25, 0.5, 0.75, +-1 are exact in bfloat16; norms 18 and 25 too
    assert torch.allclose(out, reference, atol=1e-4)
    half = build_margin_head(name)(cosine.half(), labels, norms.half())
    assert half.dtype == torch.float32 and torch.allclose(half, reference, atol=1e-4)


def test_combined_margin_rejects_bad_labels_and_parameters():
    head = build_margin_head("arcface")
    with pytest.raises(ValueError, match="label column 3 is outside"):
        head(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label column -2"):
        head(torch.zeros(2, 3), torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="int64"):
        head(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        CombinedMargin(interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="m1 > 0"):
        CombinedMargin(m1=0.0)


# ---------------------------------------------------------------- AdaFace


def test_adaface_logits_and_ema_by_hand():
    head = AdaFace()  # s=64, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3; buffers mu=20, sigma=100
    cosine = _cos([[0.5, 0.1], [0.2, 0.6], [0.3, -0.4]]).requires_grad_(True)
    labels = torch.tensor([0, 1, -1])
    norms = torch.tensor([30.0, 10.0, 20.0])
    logits = head(cosine, labels, norms)
    # batch: mean 20, std (Bessel) sqrt((10^2 + 10^2 + 0) / 2) = 10
    # mu = 0.01*20 + 0.99*20 = 20 ; sigma = 0.01*10 + 0.99*100 = 99.1
    assert head.batch_mean.item() == pytest.approx(20.0)
    assert head.batch_std.item() == pytest.approx(99.1)
    # g(30) = (30 - 20) / (99.1 + 0.001) * 0.333 = 0.0336021 ; g(10) = -0.0336021 ; g(20) = 0
    # row 0: theta = pi/3 = 1.0471976; theta - 0.4*0.0336021 = 1.0337567; cos = 0.5115946;
    #        minus (0.4 + 0.4*0.0336021) = 0.4134408 -> 0.0981538 -> x64 = 6.281840
    # row 1: theta = acos(0.6) = 0.9272952; + 0.4*0.0336021 = 0.9407361; cos(0.9407361) = 0.5891935;
    #        minus (0.4 - 0.0134408) = 0.3865592 -> 0.2026343 -> x64 = 12.968595
    # row 2: label -1 -> no margin (its norm still counted in the statistics above)
    expected = S * cosine.detach()
    expected[0, 0], expected[1, 1] = 6.281840, 12.968595
    assert torch.allclose(logits, expected, atol=1e-4)
    # gradient of the target logit: s * sin(theta - m g) / sin(theta) = 64 * sin(1.0337567) / sin(1.0471976)
    #                               = 64 * 0.8592270 / 0.8660254 = 63.497590
    logits[0, 0].backward()
    assert cosine.grad[0, 0].item() == pytest.approx(63.497590, abs=1e-3)

    # second batch: norms 0.0001 (clipped to 0.001) and 40 -> mean 20.0005, std 39.999 / sqrt(2) = 28.283564
    # mu = 0.01*20.0005 + 0.99*20 = 20.000005 ; sigma = 0.01*28.283564 + 0.99*99.1 = 98.391836
    head(_cos([[0.1], [0.2]]), torch.tensor([0, 0]), torch.tensor([0.0001, 40.0]))
    assert head.batch_mean.item() == pytest.approx(20.000005, abs=1e-5)
    assert head.batch_std.item() == pytest.approx(98.391836, abs=1e-4)


def test_adaface_eval_mode_and_state_dict():
    head = AdaFace(t_alpha=0.5)
    head(_cos([[0.3, 0.1], [0.2, 0.4]]), torch.tensor([0, 1]), torch.tensor([10.0, 30.0]))
    # mean 20 -> mu = 0.5*20 + 0.5*20 = 20 ; std sqrt(200) = 14.142136 -> sigma = 0.5*14.142136 + 0.5*100 = 57.071068
    assert head.batch_std.item() == pytest.approx(57.071068, abs=1e-4)
    state = head.state_dict()
    assert set(state) == {"batch_mean", "batch_std"}
    restored = AdaFace(t_alpha=0.5)
    restored.load_state_dict(state)
    restored.eval()
    cosine, labels, norms = _cos([[0.5, 0.1]]), torch.tensor([0]), torch.tensor([50.0])
    out = restored(cosine, labels, norms)
    assert restored.batch_mean.item() == pytest.approx(20.0) and restored.batch_std.item() == pytest.approx(57.071068)
    # g = clip((50 - 20) / 57.072068 * 0.333, -1, 1) = 0.1750418; theta - 0.4 g = 1.0471976 - 0.0700167 = 0.9771808
    # cos(0.9771808) = 0.5593617; minus (0.4 + 0.0700167) -> 0.0893449 -> x64 = 5.718075
    assert out[0, 0].item() == pytest.approx(5.718075, abs=1e-4)


def test_adaface_finite_at_cos_plus_minus_one_and_single_sample():
    head = AdaFace()
    cosine = _cos([[1.0, -1.0], [-1.0, 1.0]]).requires_grad_(True)
    logits = head(cosine, torch.tensor([0, 0]), torch.tensor([5.0, 80.0]))
    logits.sum().backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cosine.grad).all()
    one = AdaFace()
    one(_cos([[0.5]]), torch.tensor([0]), torch.tensor([40.0]))
    # one sample: mean updated (0.01*40 + 0.99*20 = 20.2), std undefined -> kept at 100
    assert one.batch_mean.item() == pytest.approx(20.2) and one.batch_std.item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="norms"):
        one(_cos([[0.5]]), torch.tensor([0]))


# ---------------------------------------------------------------- GB-CosFace


def test_gbcosface_loss_by_hand():
    head = GBCosFace()  # s=32, m=0.16, alpha=0.15, rate=0.01, pv_range=(0.5, 0.7)
    cosine = _cos([[0.8, 0.3, 0.1], [0.2, 0.6, 0.4]])
    labels = torch.tensor([0, 1])
    loss = head(cosine, labels)
    # cos_p = 0.8, 0.6
    # cos_n = logsumexp(32 * [0.3, 0.1]) / 32 = (9.6 + log(1 + e^-6.4)) / 32 = (9.6 + 0.0016602) / 32 = 0.3000519
    #         row 1: (12.8 + 0.0016602) / 32 = 0.4000519
    # cos_v = (0.8 + 0.3000519) / 2 = 0.5500259 ; (0.6 + 0.4000519) / 2 = 0.5000259 ; mean 0.5250259
    # first batch: p_v = clamp(0.5250259, 0.5, 0.7) = 0.5250259
    # b = cos_v + 0.15 (p_v - cos_v) = 0.5500259 - 0.00375 = 0.5462759 ; 0.5000259 + 0.00375 = 0.5037759
    # L_pos = softplus(64 (b - cos_p + 0.16)) = softplus(-5.9983398) = 0.0024798 ; softplus(4.0816602) = 4.0983987
    # L_neg = softplus(64 (cos_n - b + 0.16)) = softplus(-5.5183398) = 0.0040045 ; softplus(3.6016602) = 3.6285732
    # loss = ((0.0024798 + 4.0983987) / 2 + (0.0040045 + 3.6285732) / 2) / 2 = 1.9333640
    assert loss.item() == pytest.approx(1.9333640, abs=1e-5)
    assert bool(head.pv_initialised)
    # stored: clamp(0.99 * 0.5250259 + 0.01 * 0.5250259) = 0.5250259
    assert head.pv.item() == pytest.approx(0.5250259, abs=1e-6)
    # the same loss from the parts (smooth max worked above)
    again = GBCosFace()
    parts = again.loss_from_parts(torch.tensor([0.8, 0.6]), torch.tensor([0.3000519, 0.4000519]), batch_is_global=True)
    assert parts.item() == pytest.approx(1.9333640, abs=1e-5)


def test_gbcosface_pv_ema_and_clamp():
    head = GBCosFace()
    # first batch mean of cos_v = (0.3 + 0.1) / 2 = 0.2 -> clamped up to 0.5
    head.loss_from_parts(torch.tensor([0.3]), torch.tensor([0.1]))
    assert head.pv.item() == pytest.approx(0.5)  # 0.99*0.5 + 0.01*0.2 = 0.497 -> clamped to 0.5
    # batch mean 0.9: uses p_v = 0.5, stores 0.99*0.5 + 0.01*0.9 = 0.504
    head.loss_from_parts(torch.tensor([1.0, 0.9]), torch.tensor([0.8, 0.9]))
    assert head.pv.item() == pytest.approx(0.504, abs=1e-6)
    # the boundary used is the stored p_v before this batch's update: b = cos_v + 0.15 (0.504 - cos_v)
    cos_p, cos_n = torch.tensor([0.9]), torch.tensor([0.5])
    cos_v = 0.7
    b = cos_v + 0.15 * (0.504 - cos_v)  # 0.6706
    by_hand = (F.softplus(torch.tensor(64 * (b - 0.9 + 0.16))) + F.softplus(torch.tensor(64 * (0.5 - b + 0.16)))) / 2
    assert head.loss_from_parts(cos_p, cos_n).item() == pytest.approx(by_hand.item(), abs=1e-5)
    # p_v = 0.99*0.504 + 0.01*0.7 = 0.50596
    assert head.pv.item() == pytest.approx(0.50596, abs=1e-6)
    high = GBCosFace()
    for _ in range(3):
        high.loss_from_parts(torch.tensor([1.0]), torch.tensor([0.98]))  # mean 0.99 -> clamp 0.7, stays 0.7
        assert high.pv.item() == pytest.approx(0.7)


def test_gbcosface_eval_mode_gradients_and_errors():
    head = GBCosFace().eval()
    head.loss_from_parts(torch.tensor([0.9]), torch.tensor([0.2]))
    assert not bool(head.pv_initialised) and head.pv.item() == 0.0  # eval: buffers untouched
    head.train()
    cosine = _cos([[1.0, -1.0, 1.0], [-1.0, 1.0, 0.0]]).requires_grad_(True)
    loss = head(cosine, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cosine.grad).all()
    with pytest.raises(ValueError, match="needs every target column"):
        head(torch.zeros(2, 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        head(torch.zeros(2, 1), torch.tensor([0, 0]))


def test_gbcosface_output_float32_under_autocast():
    cosine = _cos([[0.75, 0.25, -0.5], [0.5, 1.0, 0.25]])
    labels = torch.tensor([0, 1])
    reference = GBCosFace()(cosine, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GBCosFace()(cosine.bfloat16(), labels)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(reference.item(), abs=1e-4)


# ---------------------------------------------------------------- builder


def test_build_margin_head_presets_and_errors():
    assert MARGIN_HEADS == ("arcface", "cosface", "sphereface", "combined", "adaface", "gbcosface")
    arc = build_margin_head("arcface")
    assert (arc.s, arc.m1, arc.m2, arc.m3) == (64.0, 1.0, 0.5, 0.0)
    cos = build_margin_head("cosface", s=30)
    assert (cos.s, cos.m3) == (30.0, 0.4)
    sphere = build_margin_head("sphereface")
    assert sphere.m1 == 1.35 and sphere.monotone_past_pi and not arc.monotone_past_pi and not cos.monotone_past_pi
    assert not build_margin_head("combined").monotone_past_pi
    assert not build_margin_head("sphereface", monotone_past_pi=0).monotone_past_pi
    with pytest.raises(ValueError, match="monotone_past_pi must be 0/1"):
        build_margin_head("arcface", monotone_past_pi=0.5)
    assert isinstance(build_margin_head("adaface", m=0.8), AdaFace)
    assert build_margin_head("gbcosface").kind == "positive_negative"
    with pytest.raises(ValueError, match="unknown margin head 'magface'.*arcface, cosface, sphereface"):
        build_margin_head("magface")
    with pytest.raises(TypeError):
        build_margin_head("arcface", margin=0.3)
