"""Data sets held in memory as uint8 tensors, and the Magnet batch sampler."""
from datasets.data import DATASETS, ImageData, augment, balanced_subset, load_dataset, to_float
from datasets.magnet_sampler import MagnetSampler

__all__ = ["DATASETS", "ImageData", "MagnetSampler", "augment", "balanced_subset",
           "load_dataset", "to_float"]
