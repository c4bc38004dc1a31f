"""The teacher cache's errors, at the bottom of its modules so that every one of them can raise
them (the fingerprints too: a collate function that cannot be fingerprinted is a
:class:`CacheError`)."""

from __future__ import annotations


class CacheError(RuntimeError):
    """A teacher cache cannot be used."""


class StaleCacheError(CacheError):
    """The cache was built for other teacher weights, data or settings."""


class CorruptCacheError(CacheError):
    """A cache file does not hold what its manifest says."""


# Named by their public module, where they were defined before the cache was split into modules:
# tracebacks, reprs and pickles (an error sent back from a DataLoader worker) name them
# pykd.cache.<name> as before.
for _error in (CacheError, StaleCacheError, CorruptCacheError):
    _error.__module__ = "pykd.cache"
del _error
