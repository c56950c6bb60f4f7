"""Datasets (tfds:, folder:, idx:, npz:, digits) streamed as u8 batches, and JAX transforms.

    ds = open_dataset("idx:../shared/datasets/fashion-mnist", val_fraction=0.1)
    for images, labels in ds.iter_batches("train", 256, shuffle=True, seed=epoch):
      x = normalize(images, ds.mean, ds.std)  # u8[B, H, W, ch] -> f32, normalised

Modules: ``source`` (the Source base class, shared helpers and SOURCES, the table of spec
prefixes), ``arrays``/``folder``/``tfds_source`` (the sources; each registers its prefixes),
``dataset`` (Dataset and open_dataset), ``loader`` (how batches are read: ``sync``, or ``grain``
with worker processes and prefetch; ``Dataset.epochs`` for training loops), ``transforms`` (JAX
image transforms).
"""

from wmdd_jax.data.dataset import Dataset, open_dataset
from wmdd_jax.data.loader import EpochBatches, LoaderOptions, epoch_seed
from wmdd_jax.data.source import NORMALIZATION, SOURCES, Source, SourceKind, register_source
from wmdd_jax.data.transforms import (
    augment_batch,
    clip_to_valid,
    crop_and_resize,
    denormalize,
    flip,
    jitter,
    normalize,
    pad_and_random_crop,
    random_flip,
    random_resized_crop,
    resize_center_crop,
    roll_shift,
    sample_crop_box,
    to_float,
)

__all__ = [
    "NORMALIZATION",
    "SOURCES",
    "Dataset",
    "EpochBatches",
    "LoaderOptions",
    "Source",
    "SourceKind",
    "augment_batch",
    "clip_to_valid",
    "crop_and_resize",
    "denormalize",
    "epoch_seed",
    "flip",
    "jitter",
    "normalize",
    "open_dataset",
    "pad_and_random_crop",
    "random_flip",
    "random_resized_crop",
    "register_source",
    "resize_center_crop",
    "roll_shift",
    "sample_crop_box",
    "to_float",
]
