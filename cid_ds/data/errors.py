"""The error every data module raises for bad input (a shard, a sample key, a cache or manifest file); its
message names the file and, where there is one, the key."""
from __future__ import annotations

from typing import Iterable, Iterator


class DataError(ValueError):
    """Bad input data: a shard, a sample key or a cache file; the message names it."""


def pass_data_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """In a DataLoader worker: turn a DataError into a ``{"data_error": message}`` item. A worker's
    exception reaches the main process as a formatted traceback, and formatting one can itself fail
    (CPython 3.11 up to 3.11.7, gh-106905: a SystemError replaces the message)."""
    try:
        yield from batches
    except DataError as e:
        yield {"data_error": str(e)}


def raise_data_errors(loader: Iterable[dict]) -> Iterator[dict]:
    """In the main process: re-raise what ``pass_data_errors`` passed on."""
    for batch in loader:
        if "data_error" in batch:
            raise DataError(batch["data_error"])
        yield batch
