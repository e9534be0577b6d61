"""Teacher cache: the teachers' embeddings for every sample and view, computed once and read back."""

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
    "diff_dicts",
    "shard_file_name",
]
