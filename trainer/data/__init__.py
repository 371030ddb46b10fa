"""The data layer: shard sources, the streaming webdataset pipeline, transforms, shard writing.

Free of Lightning and Hydra, so it can be used and tested on its own.
"""

from trainer.data.buckets import Buckets, generate_buckets, resize_and_crop
from trainer.data.pipeline import DataStats, FaultCounter, SampleFilter, ShardDataset, ShardLoader
from trainer.data.shards import ShardWriter, encode_image, read_manifest
from trainer.data.sources import Source, check_sources, expand_urls, open_url, resolve_sources
from trainer.data.transforms import ImageTransform, decode_image, denormalize

__all__ = [
    "Buckets",
    "DataStats",
    "FaultCounter",
    "ImageTransform",
    "SampleFilter",
    "ShardDataset",
    "ShardLoader",
    "ShardWriter",
    "Source",
    "check_sources",
    "decode_image",
    "denormalize",
    "encode_image",
    "expand_urls",
    "generate_buckets",
    "open_url",
    "read_manifest",
    "resize_and_crop",
    "resolve_sources",
]
