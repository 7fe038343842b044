"""Data: sources (where images come from) and the in-memory pipeline (how they reach the model)."""

from cnnlab._lazy import lazy_attributes

# Imported on first use: `cnnlab.data.images` (or any other module here) can be imported without the pipeline.
_PUBLIC = {
    "AUGMENTATIONS": "cnnlab.data.pipeline",
    "BatchLoader": "cnnlab.data.pipeline",
    "Dataset": "cnnlab.data.types",
    "ImageSet": "cnnlab.data.types",
    "Normalization": "cnnlab.data.pipeline",
    "augment_batch": "cnnlab.data.pipeline",
    "channel_stats": "cnnlab.data.pipeline",
    "list_sources": "cnnlab.data.sources",
    "load_dataset": "cnnlab.data.sources",
    "register_source": "cnnlab.data.sources",
    "source_info": "cnnlab.data.sources",
    "stratified_split": "cnnlab.data.types",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_attributes(globals(), _PUBLIC)
