"""Template pooling with a learned aggregator and plain mean pooling (utils/evaluation/ijb.py), by hand."""

import torch

from utils.evaluation.ijb import aggregated_template_features, mean_template_features, pad_templates


def test_mean_pooling_averages_unit_features_and_ignores_media():
    # template 7: (3, 0) and (0, 1) -> units (1, 0), (0, 1) -> mean (0.5, 0.5) -> (0.7071, 0.7071);
    # template 2: (0, 2) alone -> (0, 1). Norm weighting would give (3, 1) / sqrt(10) for template 7 instead.
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    ids, feats = mean_template_features(embeddings, torch.tensor([7, 2, 7]))
    assert ids.tolist() == [2, 7]
    torch.testing.assert_close(feats, torch.tensor([[0.0, 1.0], [0.5**0.5, 0.5**0.5]]))


def _norm_weighted_sum(calls):
    """An aggregator worked out by hand: sum of norm x unit over the real rows (records the padded shapes)."""

    def aggregate(units, norms, mask):
        calls.append(tuple(mask.shape))
        assert bool((units[~mask] == 0).all()) and bool((norms[~mask] == 0).all())  # padding carries nothing
        return (units * norms[..., None] * mask[..., None]).sum(1)

    return aggregate


def test_aggregated_features_batch_by_size_and_match_one_template_at_a_time():
    generator = torch.Generator().manual_seed(0)
    sizes = {10: 1, 11: 6, 12: 2, 13: 6, 14: 40, 15: 3}
    templates = torch.cat([torch.full((n,), t) for t, n in sizes.items()])
    embeddings = torch.randn(len(templates), 8, generator=generator) * 5
    shuffle = torch.randperm(len(templates), generator=generator)
    calls = []
    ids, feats = aggregated_template_features(
        embeddings[shuffle], templates[shuffle], _norm_weighted_sum(calls), max_batch_rows=16
    )
    assert ids.tolist() == sorted(sizes)
    for row, template in enumerate(ids.tolist()):
        expected = torch.nn.functional.normalize(embeddings[templates == template].sum(0), dim=0)
        torch.testing.assert_close(feats[row], expected)
    # sorted by size (1, 2, 3, 6, 6, 40) and cut at 16 padded rows: [1 2 3] (3 x 3), [6 6] (2 x 6), [40] alone
    assert calls == [(3, 3), (2, 6), (1, 40)]


def test_pad_templates_keeps_each_templates_rows_in_order():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 3.0], [4.0, 0.0]])
    units, norms, mask = pad_templates(embeddings, torch.tensor([1, 0, 1]), 2)
    assert mask.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(norms, torch.tensor([[3.0, 0.0], [1.0, 4.0]]))
    torch.testing.assert_close(units[1], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
