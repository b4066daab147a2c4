"""Atomic file output: every artifact is written under a temporary name, then renamed into place,
so a crash leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

MANIFEST = "manifest.json"  # every artifact folder's description: the stage that wrote it, its inputs, complete



@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        fsync_file(tmp)  # else a crash soon after the rename can leave an empty file under the final name
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_space(path: str) -> str:
    """The free space on the file system of ``path`` (or of its nearest existing parent), for messages."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free on {path}"


class OutputNotWritable(ValueError):
    """An output folder a stage cannot write (read-only, full, not a folder, no permission)."""


def check_writable(directory: str) -> None:
    """Create ``directory`` if needed and write, sync and remove a probe file in it: a stage that cannot write
    its outputs stops before its work, naming the folder, instead of failing after it."""
    try:
        os.makedirs(directory, exist_ok=True)
        # a unique name: ranks on other machines (same pids in identical containers) probe a shared folder too
        descriptor, probe = tempfile.mkstemp(prefix=".write_probe", dir=directory)
        with os.fdopen(descriptor, "wb") as f:
            f.write(b"probe")
        fsync_file(probe)
        os.remove(probe)
    except OSError as e:
        raise OutputNotWritable(f"{directory}: cannot write there ({e.strerror}; {free_space(directory)})") from None


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str) -> Any:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None


def read_manifest(folder: str) -> Optional[dict]:
    """``folder``'s manifest as far as it is written, None when it has none (or not a JSON object): what an error
    about an unfinished or missing artifact can still tell. The artifact's own class checks it before use."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path)
    return manifest if isinstance(manifest, dict) else None


def manifest_to_continue(folder: str) -> Optional[dict]:
    """The manifest a stage re-run in ``folder`` continues, None when there is none. A manifest.json there that
    is not a JSON object was not written by a stage: it is refused (ValueError naming it), never written over."""
    manifest = read_manifest(folder)
    if manifest is None and os.path.isfile(os.path.join(folder, MANIFEST)):
        raise ValueError(f"{os.path.join(folder, MANIFEST)} is not a JSON object, so no stage wrote it: refusing to "
                         "write over it; use another --out or delete it")
    return manifest


def load_numeric_npy(path: str, mmap: bool = False) -> "np.ndarray":
    """A .npy array of numbers, never unpickled: a file of Python objects (or any other dtype) is refused with
    a DataError naming it, where numpy would raise from deep inside."""
    import numpy as np

    from cid_ds.data.errors import DataError
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not an array of numbers ({e}); it is never unpickled: write it with "
                        "numpy.save from a float array") from None
    if array.dtype.kind not in "fiu":
        raise DataError(f"{path}: holds {array.dtype} values, not numbers")
    return array
