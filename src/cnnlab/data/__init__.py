"""Data: sources (where images come from) and the in-memory pipeline (how they reach the model)."""

from cnnlab.data.pipeline import AUGMENTATIONS, BatchLoader, Normalization, augment_batch, channel_stats
from cnnlab.data.sources import (
    Dataset,
    ImageSet,
    list_sources,
    load_dataset,
    register_source,
    source_info,
    stratified_split,
)

__all__ = [
    "AUGMENTATIONS",
    "BatchLoader",
    "Dataset",
    "ImageSet",
    "Normalization",
    "augment_batch",
    "channel_stats",
    "list_sources",
    "load_dataset",
    "register_source",
    "source_info",
    "stratified_split",
]
