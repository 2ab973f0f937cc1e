"""utils.ssk, the library behind SSK.py: split validation, centres with their fingerprint, K bounds, the report.

SSK.py end to end (files, messages, torchrun) is tests/test_ssk_cli.py.
"""

import logging

import pytest
import torch

from utils.ssk import (
    CLUSTERING_KEY,
    EVAL_FUNCS,
    K_ESTIMATION_KEY,
    MissingInputError,
    Protocol,
    SSKInputError,
    features_fingerprint,
    format_report,
    k_search_bounds,
    load_centres,
    save_centres,
    score_set,
    validate_split,
    validate_splits,
)


def split(n: int = 6, dim: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    labels = torch.arange(n) % 3
    return {
        "features": torch.randn(n, dim, generator=torch.Generator().manual_seed(n)).to(dtype),
        "labels": labels,
        "uq_idx": torch.arange(n),
        "known_mask": labels < 2,
        "labelled_mask": torch.arange(n) < 2,
        "meta": {"num_classes": 3, "num_known": 2},
    }


def test_validate_split_returns_float32_and_names_the_source():
    assert validate_split(split(dtype=torch.float64), "a.pt")["features"].dtype == torch.float32
    bad = split()
    bad["known_mask"] = bad["known_mask"].long()
    with pytest.raises(SSKInputError, match=r"a.pt: 'known_mask' must be a 1-D bool tensor, got torch.int64 \(6,\)"):
        validate_split(bad, "a.pt")


def test_validate_splits_refuses_different_widths():
    with pytest.raises(SSKInputError, match="feature widths differ: tr has D=3, te D=4"):
        validate_splits({"train": split(), "test": split(dim=4)}, {"train": "tr", "test": "te"})


def test_saved_centres_load_back_only_for_the_same_features_and_protocol(tmp_path, caplog):
    data = split()
    fingerprint = features_fingerprint(data["features"], data["labelled_mask"], "train.pt")
    assert (fingerprint["rows"], fingerprint["dim"], fingerprint["path"]) == (6, 3, "train.pt")
    centres = torch.randn(3, 3)
    path = save_centres(tmp_path / "centres.pt", centres, fingerprint, Protocol.GCD)
    saved = torch.load(path, weights_only=True)
    assert (saved["K"], saved["D"], saved["protocol"], saved["features"]) == (3, 3, "gcd", fingerprint)
    assert torch.equal(load_centres(path, fingerprint, 3, Protocol.GCD), centres)
    with pytest.raises(SSKInputError, match="fitted with --ssk-protocol gcd, this run uses reference"):
        load_centres(path, fingerprint, 3, Protocol.REFERENCE)
    relabelled = features_fingerprint(data["features"], data["labelled_mask"].roll(1), "train.pt")
    with pytest.raises(SSKInputError, match="fitted with another labelled subset"):
        load_centres(path, relabelled, 3, Protocol.GCD)
    with pytest.raises(SSKInputError, match=r"must hold \(4, 3\) float centres for --K 4, found \(3, 3\)"):
        load_centres(path, fingerprint, 4, Protocol.GCD)
    with pytest.raises(MissingInputError, match="--ssk-mode test needs .*; run SSK.py with --ssk-mode train first"):
        load_centres(tmp_path / "absent.pt", fingerprint, 3, Protocol.GCD)
    torch.save(centres, path)  # the reference's bare tensor
    with caplog.at_level(logging.WARNING, logger="SSK"):
        assert torch.equal(load_centres(path, fingerprint, 3, Protocol.GCD), centres)
    assert "is a bare tensor (old format)" in caplog.text


def test_k_search_bounds_defaults_and_errors():
    assert k_search_bounds(4, 8, 240) == (4, 16)
    assert k_search_bounds(4, 200, 240) == (4, 240)  # 2 x identities capped at the number of images
    assert k_search_bounds(4, 8, 240, min_classes=5, max_classes=9) == (5, 9)
    with pytest.raises(SSKInputError, match="--min-classes 3 is below the number of labelled classes M=4"):
        k_search_bounds(4, 8, 240, min_classes=3)
    with pytest.raises(SSKInputError, match=r"--max-classes 241 exceeds the number of training images \(240\)"):
        k_search_bounds(4, 8, 240, max_classes=241)
    with pytest.raises(SSKInputError, match="the default 2 x 2 identities gives 4, which must exceed"):
        k_search_bounds(4, 2, 240)
    with pytest.raises(SSKInputError, match="--K auto scores candidates on the labelled training images"):
        k_search_bounds(0, 8, 240)


def test_score_set_and_report():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([1, 1, 0, 0, 2, 2])
    block = score_set(labels, pred, labels < 2, "unlabelled")
    assert block["set"] == "unlabelled" and block["num_samples"] == 6
    assert all(block[v.value] == {"all": 1.0, "old": 1.0, "new": 1.0} for v in EVAL_FUNCS)
    assert block[CLUSTERING_KEY]["nmi"] == pytest.approx(1.0)
    test = score_set(labels[:4], pred[:4], torch.ones(4, dtype=torch.bool), "test")
    estimate = {"search": "brent", "min_K": 2, "max_K": 6, "K": 3, "true_K": 3}
    estimate["evaluated"] = [{"K": 2, "labelled_acc": 0.5}, {"K": 3, "labelled_acc": 1.0}]
    text = format_report({"train": block, "test": test, K_ESTIMATION_KEY: estimate}, Protocol.GCD)
    assert "SS-K-Means Train ACC Unlabelled_v2: All 1.0000 | Old 1.0000 | New 1.0000" in text
    assert "SS-K-Means Test ACC_v2: All 1.0000 | Old 1.0000 | New   n/a " in text
    assert "K estimation (brent over [2, 6], 2 candidates): K = 3 (labelled accuracy 1.0000) | true K = 3" in text
    assert (
        format_report({"train": block, "test": test}, Protocol.REFERENCE)
        .splitlines()[-1]
        .startswith("K-Means Test clustering: pairwise F 1.0000")
    )
