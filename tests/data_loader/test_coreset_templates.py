"""Simulated templates for the aggregator (data_loader/templates.py)."""

import numpy as np
import torch

from data_loader.templates import CachedTemplates, TemplateSampler, draw_template


def test_template_sizes_and_clips_follow_the_protocol():
    rng = np.random.default_rng(0)
    sizes, lengths = [], []
    for _ in range(2000):
        clips = draw_template(rng, [5, 6, 7], max_size=20, max_clip=3)
        assert all(len(set(clip)) == 1 and clip[0] in (5, 6, 7) for clip in clips)  # a clip repeats one image
        sizes.append(sum(len(c) for c in clips))
        lengths += [len(c) for c in clips]
    assert set(sizes) == set(range(1, 21))  # N ~ U{1..20}
    assert abs(np.mean(sizes) - 10.5) < 0.5
    assert set(lengths) == {1, 2, 3}


def _cached(seed: int = 0) -> CachedTemplates:
    # image i, view v has embedding (i, v, 0, ...): identity 0 owns images 0-2, identity 1 images 3-4
    cache = torch.zeros(5, 4, 6)
    cache[:, :, 0] = torch.arange(5.0)[:, None]
    cache[:, :, 1] = torch.arange(4.0)[None, :]
    return CachedTemplates(cache, np.array([0, 0, 0, 1, 1]), seed=seed, max_size=8, max_clip=3)


def test_cached_templates_are_padded_and_reproducible_per_epoch_and_item():
    data = _cached()
    frames, mask, label, noise_seed = data[(2, 4)]
    n = int(mask.sum())
    assert frames.shape == (8, 6) and mask[:n].all() and not mask[n:].any() and label == 1
    assert set(frames[:n, 0].tolist()) <= {3.0, 4.0}  # images of identity 1 only
    assert bool((frames[n:] == 0).all())
    again = data[(2, 4)]
    assert torch.equal(again[0], frames) and again[3] == noise_seed
    draws = {tuple(data[(epoch, 4)][0][:, :2].flatten().tolist()) for epoch in range(6)}
    assert len(draws) > 1  # another epoch, another template
    # a clip of L <= A frames takes L distinct views of its image
    rows = data.frames(np.random.default_rng(1), [[3, 3, 3], [1]])
    assert rows[:3, 0].tolist() == [3.0, 3.0, 3.0] and len(rows[:3, 1].unique()) == 3 and rows[3, 0] == 1.0


def test_sampler_items_carry_the_epoch():
    sampler = TemplateSampler(6, seed=1)
    sampler.set_epoch(3)
    items = list(sampler)
    assert sorted(i for _, i in items) == list(range(6)) and {e for e, _ in items} == {3}
    sampler.set_epoch(4)
    assert [i for _, i in sampler] != [i for _, i in items]
    assert sampler.state_dict() == {"epoch": 4, "seed": 1}
