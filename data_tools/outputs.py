"""What the offline stages share about their output folder: a re-run must be the same run, and figures
are written atomically like every other artifact."""
from __future__ import annotations

import os
from typing import Optional

from matplotlib.figure import Figure

from cid_ds.data.features import FeatureCache
from cid_ds.data.joins import Artifact, teacher_conflicts
from cid_ds.io import MANIFEST, atomic_path, manifest_to_continue


class OtherRun(ValueError):
    """An output folder holds a run of other parameters or inputs."""

    def __init__(self, message: str, out_dir: str):
        super().__init__(message)
        self.out_dir = out_dir


def check_rerun(out_dir: str, identity: dict, what: str, cache: Optional[FeatureCache] = None) -> Optional[dict]:
    """The manifest already in ``out_dir`` (None if there is none), after refusing any field of
    ``identity`` (parameters, inputs) or, given the cache, a teacher that differs from this run's."""
    path, manifest = os.path.join(out_dir, MANIFEST), manifest_to_continue(out_dir)
    if manifest is None:
        return None
    lines = [f"{path}: {name} is {manifest.get(name)} but this run has {name} = {value}"
             for name, value in identity.items() if manifest.get(name) != value]
    if cache is not None:
        lines += teacher_conflicts(Artifact("earlier run", path, manifest.get("teacher", {})), cache)
    if lines:
        raise OtherRun("\n".join(lines) + f"\nrefusing to mix two {what} in one folder: use another --out "
                       f"or delete {out_dir}", out_dir)
    return manifest


def save_figure(fig: Figure, path: str) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
