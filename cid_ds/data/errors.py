"""The error every data module raises for bad input (a shard, a sample key, a cache or manifest file); its
message names the file and, where there is one, the key."""


class DataError(ValueError):
    """Bad input data: a shard, a sample key or a cache file; the message names it."""
