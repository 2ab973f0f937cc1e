"""Data helpers: benchmark registry, GCD datasets, transforms, the balanced sampler, RecordIO and builders."""

from data_loader.datasets import GCDDataset, GCDDatasets, build_gcd_datasets
from data_loader.registry import BenchmarkSpec, DatasetError, get_spec, list_datasets

__all__ = [
    "BenchmarkSpec",
    "DatasetError",
    "GCDDataset",
    "GCDDatasets",
    "build_gcd_datasets",
    "get_spec",
    "list_datasets",
]
