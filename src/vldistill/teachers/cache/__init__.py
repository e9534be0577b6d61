"""Teacher cache: the teachers' embeddings for every sample and view, and of cropped regions, computed once and
read back."""

from vldistill.teachers.cache.regions import (
    REGION_FIELD,
    build_region_cache,
    crop_regions,
    region_cache_meta,
    region_embeddings,
)
from vldistill.teachers.cache.store import (
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheReader,
    CacheViewMismatchError,
    CacheWriter,
    diff_dicts,
    shard_file_name,
)

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheFormatError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "CacheReader",
    "CacheViewMismatchError",
    "CacheWriter",
    "REGION_FIELD",
    "build_region_cache",
    "crop_regions",
    "diff_dicts",
    "region_cache_meta",
    "region_embeddings",
    "shard_file_name",
]
