"""The run's sources: the shards (packed or not), the side feature cache, the online teacher and the cluster
assignments, each checked complete, cross-checked with the others (one teacher, one clustering, matching
widths) and turned into what the trainer needs, before any work."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from cid_ds.config import TEACHER_TERMS, Config, ConfigError, expand_shards, must_exist
from cid_ds.data.batch import SideData
from cid_ds.io import MANIFEST
from cid_ds.losses.ensemble import TeacherTargets, teacher_targets

if TYPE_CHECKING:
    import torch.nn as nn

    from cid_ds.data.clusters import ClusterAssignments
    from cid_ds.data.features import FeatureCache
    from cid_ds.data.packed import PackedShards
    from cid_ds.teacher import OnlineTeacher


@dataclass
class Sources:
    shards: list[str]
    side: SideData                     # what the loaders read besides the samples, opened once for the run
    online_teacher: Optional[OnlineTeacher]
    targets: Optional[TeacherTargets]  # how the batch's teacher rows split per teacher; None: no teacher
    replay_views: int                  # stored views replayed (0: none)
    cluster_index: Optional[int]       # the teacher of an ensemble the clusters were fit on; None: all of them


@dataclass(frozen=True)
class DataSize:
    """What the manifests say of the training shards: samples per shard, and what the balance removed
    before they were packed."""
    per_shard: Optional[dict[str, int]]  # absolute shard path -> samples; None: plain shards, which nothing counts
    counted_in: Optional[str]            # the manifest that counts them
    balance: Optional[tuple[int, int]]   # packed after a balance: (samples it removed, samples it saw)

    def samples(self, shards: list[str]) -> Optional[int]:
        """The samples ``shards`` hold (None: not counted)."""
        return None if self.per_shard is None else sum(self.per_shard[os.path.abspath(p)] for p in shards)

    def describe(self, shards: list[str]) -> str:
        """``shards``, their samples and where that count comes from, in words."""
        total = self.samples(shards)
        if total is None:
            return f"{len(shards)} shards, whose samples no manifest counts (plain webdataset shards)"
        text = f"{len(shards)} shards holding {total} samples (counted in {self.counted_in})"
        if self.balance is not None:
            removed, seen = self.balance
            text += (f"; before packing, the balance (data_tools.balance) removed {removed} of {seen} samples "
                     f"({removed / max(seen, 1):.1%})")
        return text


def data_size(shards: list[str], features_dir: Optional[str]) -> DataSize:
    """What the packed manifest beside ``shards``, else the feature cache in ``features_dir`` (its samples with
    teacher features), says of ``shards``' size."""
    from cid_ds.data import features, packed
    packed_path = packed.packed_manifest_path(shards)
    if packed_path is not None:
        return _counted(shards, packed.listed_samples(packed_path), packed_path,
                        packed.removed_before_packing(packed_path))
    if features_dir is not None:
        by_stem = features.listed_samples(features_dir)
        counts = {os.path.abspath(p): by_stem[features.shard_stem(p)] for p in shards
                  if features.shard_stem(p) in by_stem}
        return _counted(shards, counts, os.path.join(features_dir, MANIFEST), None)
    return DataSize(None, None, None)


def _counted(shards: list[str], counts: dict[str, int], manifest: str, balance: Optional[tuple[int, int]]) -> DataSize:
    """A DataSize from a manifest's per-shard counts, or an uncounted one if the manifest misses a shard."""
    if all(os.path.abspath(p) in counts for p in shards):
        return DataSize(counts, manifest, balance)
    return DataSize(None, None, None)


def check_sources(cfg: Config, source: str) -> None:
    """Before any work: the artifacts ``cfg`` names are there and can serve its loss terms (a teacher for the
    teacher terms, trained teacher weights, a clustering). ``source``: how errors name the config
    (cid_ds.config.config_source)."""
    from cid_ds.data.clusters import CENTROIDS
    from cid_ds.data.packed import packed_manifest_path
    if cfg.data.features is not None:
        must_exist("data.features", os.path.join(cfg.data.features, MANIFEST), source)
    no_teacher_embeddings = cfg.kd.teacher == "cached" and cfg.data.features is None \
        and packed_manifest_path(expand_shards(cfg.data.train_shards)) is None
    teacher_terms = [name for name in TEACHER_TERMS if getattr(cfg.loss, name) > 0]
    if teacher_terms and no_teacher_embeddings:
        raise ConfigError(f"{source}: key 'loss.{teacher_terms[0]}' > 0 needs 'data.features' (a teacher feature "
                          "cache), distill-ready shards (data_tools.pack) or kd.teacher: online with model.teacher")
    if cfg.kd.teacher == "online" and not cfg.model.teacher_random_ok:
        from cid_ds.models import has_trained_weights
        if not has_trained_weights(cfg.model.teacher, cfg.model.teacher_pretrained):
            raise ConfigError(f"{source}: key 'model.teacher' {cfg.model.teacher} has no trained weights (no "
                              "'model.teacher_pretrained', no weights file in its folder), so the student would "
                              "distil noise: set its weights, or model.teacher_random_ok: true if that is meant")
    if cfg.loss.cluster > 0:
        must_exist("cluster.dir", os.path.join(cfg.cluster.dir, CENTROIDS), source)
        if cfg.cluster.soft and no_teacher_embeddings:
            raise ConfigError(f"{source}: key 'cluster.soft' needs 'data.features' (teacher embeddings)")
        check_stored_positives(cfg, source)


def open_sources(cfg: Config, clip_model: nn.Module) -> Sources:
    """Open and cross-check everything ``cfg`` trains against (``clip_model``: the student, whose input
    normalisation an online teacher converts from)."""
    from cid_ds.data.features import FeatureCache, teacher_members
    from cid_ds.data.packed import PackedShards, packed_manifest_path
    shards = expand_shards(cfg.data.train_shards)
    packed_path = packed_manifest_path(shards)
    packed = PackedShards(packed_path) if packed_path else None
    teacher, teacher_source, stored_views = None, None, 0  # the teacher (set) of the embeddings trained against
    if packed is not None:
        if not packed.complete:
            raise ConfigError(f"data.train_shards: the distill-ready shards of {packed_path} are incomplete: "
                              "re-run data_tools.pack to finish them")
        teacher, teacher_source, stored_views = packed.teacher, packed_path, packed.views
    cache = None
    if cfg.data.features is not None:
        cache = FeatureCache(cfg.data.features)
        if not cache.complete:
            raise ConfigError(f"data.features: the feature cache {cache.manifest_path} is incomplete "
                              "(extraction still running or interrupted): re-run data_tools.extract to finish it")
        teacher, teacher_source, stored_views = cache.teacher, cache.manifest_path, cache.views
    online_teacher = None
    if cfg.kd.teacher == "online":
        from cid_ds.teacher import OnlineTeacher
        online_teacher = OnlineTeacher(cfg.model.teacher, cfg.model.teacher_pretrained, clip_model,
                                       random_ok=cfg.model.teacher_random_ok)
        teacher, teacher_source = online_teacher.info, f"model.teacher {cfg.model.teacher}"
    assignments = open_clusters(cfg, packed) if cfg.loss.cluster > 0 else None
    check_teachers(cfg, packed, cache, assignments, online_teacher)
    replay_views = resolve_replay_views(cfg, stored_views, teacher_source)
    targets = None
    if teacher is not None:
        try:
            targets = teacher_targets(teacher_members(teacher), cfg.kd.ensemble, cfg.kd.teacher_weights,
                                      cfg.kd.teacher_logit_scale, teacher_source)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if None in (scale for _, scale in targets.blocks) and (cfg.loss.crd > 0 or cfg.loss.gd > 0):
            raise ConfigError(f"loss.crd/loss.gd need the teacher's logit scale: {teacher_source} predates it, "
                              "set kd.teacher_logit_scale")
    cluster_index = None
    if assignments is not None:
        from cid_ds.losses.cluster import centroid_dim
        cluster_dim, cluster_index = centroid_dim(cfg.cluster.dir), assignments.teacher_index
        if targets is None:
            targets = TeacherTargets.single(cluster_dim)
        student_side = sum(targets.head_dims) if cluster_index is None or targets.mode == "mean" \
            else targets.head_dims[cluster_index]
        if student_side != cluster_dim:
            raise ConfigError(f"cluster.dir: centroids are {cluster_dim}-d, the student's teacher-space embedding "
                              f"{student_side}-d (kd.ensemble {cfg.kd.ensemble}, teacher widths {list(targets.dims)}): "
                              "cluster every teacher with kd.ensemble per_teacher, or one teacher (--teacher-index)")
    joined_clusters = assignments if not (packed is not None and packed.topk) else None  # else the shards carry ids
    side = SideData(packed, cache, joined_clusters, cfg.data.missing_features)
    return Sources(shards, side, online_teacher, targets, replay_views, cluster_index)


def resolve_replay_views(cfg: Config, stored: int, source: Optional[str]) -> int:
    """How many stored views ``data.views: replay`` cycles through (0: not replaying)."""
    if cfg.data.views != "replay":
        return 0
    if stored == 0:
        raise ConfigError(f"data.views is replay, but {source or cfg.data.train_shards} stores no views: extract with "
                          "data_tools.extract --views K (and pack again), or use data.views random")
    if cfg.data.replay_views > stored:
        raise ConfigError(f"data.replay_views is {cfg.data.replay_views} but {source} stores {stored} views per sample")
    return cfg.data.replay_views or stored


def check_stored_positives(cfg: Config, source: str) -> None:
    """``cluster.positives`` nearest centroids are stored per sample: in the packed shards when they carry
    cluster ids (those are the ones read), else in ``cluster.dir``."""
    from cid_ds.data import clusters, packed
    packed_path = packed.packed_manifest_path(expand_shards(cfg.data.train_shards))
    in_packed = packed.stored_positives(packed_path) if packed_path is not None else 0
    where, stored = (packed_path, in_packed) if in_packed else \
        (os.path.join(cfg.cluster.dir, MANIFEST), clusters.stored_positives(cfg.cluster.dir))
    if stored is None:
        return  # open_clusters names what is missing
    if cfg.cluster.positives > stored:
        redo = " (and data_tools.pack with it)" if where == packed_path else ""
        raise ConfigError(f"{source}: key 'cluster.positives' is {cfg.cluster.positives}, but {where} stores the "
                          f"{stored} nearest centroid(s) of each sample: re-run data_tools.cluster with --topk "
                          f"{cfg.cluster.positives}{redo}")


def open_clusters(cfg: Config, packed: Optional[PackedShards]) -> ClusterAssignments:
    """``cluster.dir``'s assignments, complete, and of the clustering packed shards (if any) carry ids of."""
    from cid_ds.data.clusters import ClusterAssignments
    assignments = ClusterAssignments(cfg.cluster.dir)
    if not assignments.complete:
        raise ConfigError(f"cluster.dir: the cluster assignments in {cfg.cluster.dir} are incomplete: "
                          "re-run data_tools.cluster to finish them")
    if packed is not None and packed.topk and packed.manifest["k"] != assignments.k:
        raise ConfigError(f"cluster.dir: {assignments.manifest_path} has k = {assignments.k}, but the shards of "
                          f"{packed.manifest_path} were packed with a clustering of k = {packed.manifest['k']}: "
                          "point cluster.dir at that one")
    return assignments


def check_teachers(cfg: Config, packed: Optional[PackedShards], cache: Optional[FeatureCache],
                   assignments: Optional[ClusterAssignments], online_teacher: Optional[OnlineTeacher]) -> None:
    """Refuse artifacts of the run made from different teachers (cid_ds.data.joins). An online teacher
    replaces the stored embeddings: packed shards are then joined only for their cluster ids."""
    from cid_ds.data.joins import Artifact, check_join
    if online_teacher is None:
        check_join(packed, cache, assignments)
        return
    packed_ids = packed if packed is not None and packed.topk and assignments is not None else None
    check_join(Artifact("model.teacher", cfg.model.teacher, online_teacher.info), assignments, packed_ids)
