"""Tests for utils/logging.py: logging setup, meters, log_every, JSONL and summary.csv files, offline wandb."""

from __future__ import annotations

import csv
import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from utils.logging import (
    JsonlWriter,
    MetricLogger,
    SmoothedValue,
    WandbLogger,
    setup_logging,
    truncate_jsonl,
    truncate_summary,
    update_summary,
)


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def test_setup_logging_writes_file_on_rank0_and_filters_other_ranks(tmp_path, restore_root_logger):
    setup_logging(tmp_path, rank=0)
    setup_logging(tmp_path, rank=0)  # a second call replaces its handlers instead of duplicating lines
    log = logging.getLogger("facegcd.test")
    log.info("hello %d", 7)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO facegcd.test: hello 7")
    assert lines[0][:4].isdigit()  # starts with the timestamp

    other = tmp_path / "rank1"
    setup_logging(other, rank=1)
    assert logging.getLogger().level == logging.WARNING
    assert not (other / "log.txt").exists()


def test_smoothed_value_statistics():
    meter = SmoothedValue(window_size=3, fmt="{median:.1f} {global_avg:.2f}")
    assert math.isnan(meter.median) and math.isnan(meter.global_avg)
    for value in [1.0, 10.0, 2.0, 3.0]:
        meter.update(value)
    meter.update(torch.tensor(4.0), n=2)
    # window holds [2, 3, 4]; totals cover 1 + 10 + 2 + 3 + 2 * 4 over 6 counts
    assert meter.median == 3.0
    assert meter.avg == pytest.approx(3.0)
    assert meter.max == 4.0 and meter.value == 4.0
    assert meter.global_avg == pytest.approx(24 / 6)
    meter.synchronize_between_processes()  # world size 1: unchanged
    assert meter.count == 6 and meter.total == pytest.approx(24.0)
    assert str(meter) == "3.0 4.00"


def test_metric_logger_update_and_errors():
    metric_logger = MetricLogger(delimiter=" | ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3f}"))
    metric_logger.update(loss=torch.tensor(2.0), lr=0.1)
    metric_logger.update(loss=4.0, lr=0.05)
    assert metric_logger.loss.global_avg == pytest.approx(3.0)
    assert str(metric_logger) == "lr: 0.050 | loss: 2.0000 (3.0000)"  # median of [2, 4] is the lower one
    with pytest.raises(ValueError, match="'loss' needs a scalar"):
        metric_logger.update(loss=torch.ones(2))
    with pytest.raises(AttributeError, match="nope"):
        _ = metric_logger.nope


def test_tensor_values_are_read_only_when_the_meters_are_read():
    metric_logger = MetricLogger()
    metric_logger.update(loss=torch.tensor(1.0, device="meta"), lr=0.1)  # a meta tensor has no data to read
    metric_logger.update(loss=2.0, lr=0.05)
    assert metric_logger.loss.count == 2 and metric_logger.lr.value == 0.05
    with pytest.raises(NotImplementedError):
        str(metric_logger)


def test_pending_tensors_of_any_dtype_fold_in_update_order():
    metric_logger = MetricLogger()
    metric_logger.add_meter("peak", SmoothedValue(window_size=2))
    metric_logger.update(loss=1.0, peak=torch.tensor([0.1], dtype=torch.bfloat16))
    metric_logger.update(loss=torch.tensor(3.0, dtype=torch.float64), peak=torch.tensor(2, dtype=torch.int64), n=2)
    metric_logger.update(loss=torch.tensor(0.5), peak=0.25)
    # bfloat16 0.1 is 205/2048 = 0.10009765625 (8 significant bits). peak: window [2, 0.25] (median: the lower
    # middle value), total 0.10009765625 + 2 * 2 + 0.25 over 4 counts; loss: window [1, 3, 0.5], total 7.5 over 4
    assert str(metric_logger) == "peak: 0.2500 (1.0875)  loss: 1.0000 (1.8750)"
    assert metric_logger.peak.total == 0.10009765625 + 2 * 2.0 + 0.25 and metric_logger.peak.count == 4
    assert metric_logger.peak.value == 0.25 and metric_logger.peak.max == 2.0 and metric_logger.loss.value == 0.5
    metric_logger.update(loss=torch.tensor(4.5))  # a value after a read
    assert metric_logger.loss.total == 12.0 and metric_logger.loss.median == 1.0  # window [1, 3, 0.5, 4.5]
    with pytest.raises(TypeError, match="meter 'loss' needs a number, got str"):
        metric_logger.update(loss="1.0")


def test_log_every_yields_everything_and_logs(caplog):
    metric_logger = MetricLogger()
    seen = []
    with caplog.at_level(logging.INFO):
        for i in metric_logger.log_every(range(5), print_freq=2, header="Epoch: [0]", progress=True):
            seen.append(i)
            metric_logger.update(loss=float(i))
    assert seen == list(range(5))
    messages = [r.getMessage() for r in caplog.records if r.name == "utils.logging"]
    step_lines = [m for m in messages if m.startswith("Epoch: [0]  [")]
    assert [m.split("]  [")[1][:3] for m in step_lines] == ["0/5", "2/5", "4/5"]
    assert "eta: " in step_lines[0] and "loss: 0.0000" in step_lines[0] and "data: " in step_lines[0]
    assert "Total time" in messages[-1]
    assert metric_logger.loss.global_avg == pytest.approx(2.0)


def test_jsonl_writer_appends_lines(tmp_path):
    writer = JsonlWriter(tmp_path / "out" / "metrics.jsonl")
    writer.write({"epoch": 0, "loss": torch.tensor(1.5), "acc": np.float32(0.25)})
    writer.write({"epoch": 1, "per_set": {"test": [1, 2]}})
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 0, "loss": 1.5, "acc": 0.25}, {"epoch": 1, "per_set": {"test": [1, 2]}}]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_update_summary_rows_and_new_columns(tmp_path):
    path = tmp_path / "summary.csv"
    update_summary(9, {"train_loss": 1.25, "eval_all_acc": 0.5}, path, write_header=True)
    update_summary(19, {"train_loss": torch.tensor(1.0), "eval_all_acc": 0.6}, path)
    assert _read_csv(path) == [["epoch", "train_loss", "eval_all_acc"], ["9", "1.25", "0.5"], ["19", "1.0", "0.6"]]

    update_summary(29, {"train_loss": 0.75, "eval_all_acc": 0.7, "lr": 0.05}, path)
    assert _read_csv(path) == [
        ["epoch", "train_loss", "eval_all_acc", "lr"],
        ["9", "1.25", "0.5", ""],
        ["19", "1.0", "0.6", ""],
        ["29", "0.75", "0.7", "0.05"],
    ]
    update_summary(39, {"lr": 0.01, "train_loss": 0.5}, path)  # other order, missing column
    assert _read_csv(path)[-1] == ["39", "0.5", "", "0.01"]

    update_summary(0, {"train_loss": 2.0}, path, write_header=True)  # a new run starts the file afresh
    assert _read_csv(path) == [["epoch", "train_loss"], ["0", "2.0"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_truncate_summary_keeps_earlier_epochs(tmp_path, caplog):
    path = tmp_path / "summary.csv"
    assert truncate_summary(path, 0) == 0 and not path.exists()  # nothing to do for a new run
    for epoch in range(4):
        update_summary(epoch, {"train_loss": 1.0 / (epoch + 1), "eval_all_acc": 0.5 if epoch % 2 else None}, path)
    with caplog.at_level(logging.INFO):
        assert truncate_summary(path, 2) == 2
    assert "removed 2 rows of epochs >= 2" in caplog.text
    assert _read_csv(path) == [["epoch", "train_loss", "eval_all_acc"], ["0", "1.0", ""], ["1", "0.5", "0.5"]]
    assert truncate_summary(path, 2) == 0
    assert truncate_summary(path, 0) == 2
    assert _read_csv(path) == [["epoch", "train_loss", "eval_all_acc"]]
    update_summary(0, {"train_loss": 3.0}, path)  # the header stays and the row fills its cells
    assert _read_csv(path) == [["epoch", "train_loss", "eval_all_acc"], ["0", "3.0", ""]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("loss,epoch\n1.0,0\n", "header .* does not start with 'epoch'"),
        ("epoch,loss\n0,1.0\n1\n", "row 3 is malformed; expected 2 cells"),
        ("epoch,loss\nlast,1.0\n", "row 2 is malformed; expected 2 cells starting with an integer epoch"),
    ],
)
def test_truncate_summary_rejects_files_that_are_not_summaries(tmp_path, text, message):
    path = tmp_path / "summary.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        truncate_summary(path, 1)
    assert path.read_text() == text


def test_truncate_jsonl_keeps_earlier_epochs(tmp_path):
    path = tmp_path / "log.jsonl"
    assert truncate_jsonl(path, 0) == 0 and not path.exists()
    writer = JsonlWriter(path)
    for epoch in range(3):
        writer.write({"epoch": epoch, "train_loss": float(epoch)})
    assert truncate_jsonl(path, 1) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 0, "train_loss": 0.0}]
    writer.write({"epoch": 1, "train_loss": 5.0})
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"epoch": 0}\n{"epoch": 1\n', "line 2 is not valid JSON"),
        ('{"epoch": 0}\n{"loss": 1.0}\n', "line 2 has no integer 'epoch' field"),
        ('{"epoch": "0"}\n', "line 1 has no integer 'epoch' field"),
    ],
)
def test_truncate_jsonl_rejects_malformed_lines(tmp_path, text, message):
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        truncate_jsonl(path, 1)
    assert path.read_text() == text


def _killed(src, dst):
    raise SystemExit("killed")


@pytest.mark.parametrize(
    "name, write",
    [
        ("summary.csv", lambda path, epoch: update_summary(epoch, {"train_loss": 1.0}, path)),
        ("summary.csv", lambda path, epoch: update_summary(epoch, {"train_loss": 1.0, f"col{epoch}": 2.0}, path)),
        ("log.jsonl", lambda path, epoch: JsonlWriter(path).write({"epoch": epoch})),
    ],
    ids=["summary", "summary-new-column", "jsonl"],
)
def test_a_kill_while_writing_a_row_leaves_the_previous_file_whole(tmp_path, monkeypatch, name, write):
    """New content only arrives by renaming a complete temporary file over the old one."""
    path = tmp_path / name
    write(path, 0)
    before = path.read_text()
    monkeypatch.setattr(os, "replace", _killed)
    with pytest.raises(SystemExit, match="killed"):
        write(path, 1)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_wandb_disabled_is_noop(tmp_path):
    wandb_logger = WandbLogger(False, "proj", "run", {"a": 1}, tmp_path)
    assert not wandb_logger.enabled
    wandb_logger.log({"x": 1.0}, step=0)
    wandb_logger.finish()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_wandb_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc entry
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    out = tmp_path / "run"
    wandb_logger = WandbLogger(True, "GCD_base_prefix_gen", "unit-test", {"lr": 0.1}, out)
    assert wandb_logger.enabled
    wandb_logger.log({"eval_all_acc": 0.5}, step=9)
    wandb_logger.finish()
    assert not wandb_logger.enabled
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def _sync_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric_logger = MetricLogger()
        for value in range(rank + 1):  # rank 0 sees [0], rank 1 sees [0, 1]
            metric_logger.update(loss=float(value + 10 * rank))
        metric_logger.synchronize_between_processes()
        torch.save((metric_logger.loss.count, metric_logger.loss.total), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_meters_synchronize_across_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    # counts 1 + 2, totals 0 + (10 + 11)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == (3, 21.0)
