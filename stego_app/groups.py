"""Naming many clusters quickly: groups of similar clusters, merge suggestions, progress.

With over-clustering (K well above the classes a person expects) one class is split into
several clusters. core.hierarchy arranges the run's clusters as a tree over their centroids;
this service cuts it into groups (each nameable in one action), proposes merges ("cluster 17
looks like 'road'") and counts what share of the pixels is named.

Clusters added by click-to-find (stego_app.found; no centroid) form one group of their own
at the end. The tree depends only on ``centroids.npy``, so it is cached per process.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_json
from core.hierarchy import ClusterHierarchy, default_n_groups
from core.rundir import RunDir
from stego_app.errors import NotFound, UserError
from stego_app.labels import mapping

log = logging.getLogger(__name__)

DEFAULT_SUGGESTIONS = 8
_TREES: OrderedDict[tuple, ClusterHierarchy] = OrderedDict()
_TREES_LOCK = threading.Lock()
_MAX_TREES = 16


@dataclass(frozen=True)
class ClusterGroup:
    id: int                               # 0.. in tree order (stable for a run and n_groups)
    cluster_indices: tuple[int, ...]      # tree order
    share: float                          # of all pixels
    named_share: float                    # of all pixels, clusters of the group with a label
    label_names: tuple[str, ...]          # labels used inside the group
    unnamed: tuple[int, ...]              # clusters neither named nor ignored
    cohesion: float                       # mean cosine similarity of the centroids (1 = identical)
    found: bool = False                   # the group of click-to-find clusters


@dataclass(frozen=True)
class MergeSuggestion:
    cluster_index: int                    # an unnamed cluster
    similar_to: tuple[int, ...]           # the clusters it looks like (a label's, or one unnamed)
    label_name: str | None                # that label, or None: two unnamed clusters alike
    similarity: float                     # cosine similarity of the centroids

    @property
    def text(self) -> str:
        if self.label_name is not None:
            return (f"#{self.cluster_index} looks like '{self.label_name}' "
                    f"({', '.join(f'#{i}' for i in self.similar_to)}) · {self.similarity:.2f}")
        return f"#{self.cluster_index} and #{self.similar_to[0]} look alike · {self.similarity:.2f}"


@dataclass(frozen=True)
class NamingProgress:
    n_clusters: int
    n_named: int
    n_ignored: int
    n_unnamed: int
    n_labels: int
    named_share: float                    # share of all pixels in named clusters
    ignored_share: float
    unnamed_share: float

    @property
    def text(self) -> str:
        return (f"{self.named_share:.0%} of pixels named · {self.n_named} of {self.n_clusters} clusters "
                f"named into {self.n_labels} label{'s' if self.n_labels != 1 else ''} · "
                f"{self.n_ignored} ignored · {self.n_unnamed} to go")


def _tree(run_dir: Path) -> tuple[ClusterHierarchy, int]:
    """The run's cluster tree (cached by the centroid file's identity) and K."""
    path = RunDir(run_dir).centroids_npy
    try:
        st = path.stat()
    except OSError:
        raise UserError(f"the run directory {run_dir} has no centroids.npy; resume the run") from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _TREES_LOCK:
        tree = _TREES.get(key)
        if tree is not None:
            _TREES.move_to_end(key)
            return tree, tree.n_clusters_
    tree = ClusterHierarchy().fit(np.load(path))
    with _TREES_LOCK:
        _TREES[key] = tree
        while len(_TREES) > _MAX_TREES:
            _TREES.popitem(last=False)
    return tree, tree.n_clusters_


def _clusters(ctx, run_id: int):
    from stego_app.runs import get_run

    info = get_run(ctx, run_id)
    clusters = mapping.list_clusters(ctx, run_id)
    return info.run_dir, clusters


def chosen_n_groups(run_dir: Path, k: int) -> int:
    """The run's number of groups: the one last chosen (set_n_groups), else ~K/4."""
    try:
        n = int(json.loads(RunDir(run_dir).groups_json.read_text())["n_groups"])
        if 1 <= n <= k:
            return n
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return default_n_groups(k)


def set_n_groups(ctx, run_id: int, n_groups: int) -> int:
    """Remember how finely this run's clusters are grouped (every view and tab uses it)."""
    from stego_app.runs import get_run

    run_dir = get_run(ctx, run_id).run_dir
    _, k = _tree(run_dir)
    n = int(n_groups)
    if not 1 <= n <= k:
        raise UserError(f"the number of groups must be between 1 and {k} (the run's clusters), got {n_groups}")
    atomic_write_json(RunDir(run_dir).groups_json, {"n_groups": n})
    return n


def list_groups(ctx, run_id: int, n_groups: int | None = None) -> list[ClusterGroup]:
    """The run's clusters cut into ``n_groups`` groups of similar clusters (default: the run's
    chosen number, else ~K/4)."""
    run_dir, clusters = _clusters(ctx, run_id)
    tree, k = _tree(run_dir)
    n = chosen_n_groups(run_dir, k) if n_groups is None else int(n_groups)
    if not 1 <= n <= k:
        raise UserError(f"the number of groups must be between 1 and {k} (the run's clusters), got {n_groups}")
    by_index = {c.index: c for c in clusters}
    members = tree.groups(n)
    found = sorted(i for i in by_index if i >= k)
    out = []
    for gid, idx in enumerate(members + ([found] if found else [])):
        cs = [by_index[i] for i in idx if i in by_index]
        names = tuple(dict.fromkeys(c.label_name for c in cs if c.label_name and not c.ignored))
        out.append(ClusterGroup(
            id=gid, cluster_indices=tuple(c.index for c in cs), share=sum(c.share for c in cs),
            named_share=sum(c.share for c in cs if c.label_name and not c.ignored), label_names=names,
            unnamed=tuple(c.index for c in cs if c.label_name is None and not c.ignored),
            cohesion=tree.cohesion([c.index for c in cs]) if gid < len(members) else 1.0,
            found=gid >= len(members)))
    return out


def name_group(ctx, run_id: int, group_id: int, name: str, n_groups: int | None = None,
               only_unnamed: bool = True) -> list[mapping.ClusterInfo]:
    """Give every cluster of a group the label ``name`` in one edit.

    ``only_unnamed`` (default) leaves clusters that already have a label (or are ignored)
    as they are; otherwise every cluster of the group that is not ignored gets the name.
    """
    groups = list_groups(ctx, run_id, n_groups)
    group = next((g for g in groups if g.id == int(group_id)), None)
    if group is None:
        raise NotFound(f"run {run_id} has no group {group_id} (groups are 0..{len(groups) - 1})")
    if only_unnamed:
        targets = list(group.unnamed)
    else:
        ignored = {c.index for c in mapping.list_clusters(ctx, run_id) if c.ignored}
        targets = [i for i in group.cluster_indices if i not in ignored]
    if not targets:
        raise UserError(f"group {group_id} has no unnamed cluster left; select its clusters to rename them")
    return mapping.merge_clusters(ctx, run_id, targets, name)


def merge_suggestions(ctx, run_id: int, n: int = DEFAULT_SUGGESTIONS,
                      min_similarity: float = 0.0) -> list[MergeSuggestion]:
    """For unnamed clusters: the label (or the other unnamed cluster) they look most like.

    Most similar first; each unnamed cluster appears at most once (a pair of unnamed
    clusters once). Accept one with ``accept_suggestion``.
    """
    run_dir, clusters = _clusters(ctx, run_id)
    tree, k = _tree(run_dir)
    active = [c for c in clusters if c.index < k and not c.ignored]
    unnamed = [c.index for c in active if c.label_name is None]
    by_label: dict[str, list[int]] = {}
    for c in active:
        if c.label_name is not None:
            by_label.setdefault(c.label_name, []).append(c.index)
    candidates = [c.index for c in active]
    named = [c.index for c in active if c.label_name is not None]
    group_of = tree.labels(default_n_groups(k))
    out: list[MergeSuggestion] = []
    seen_pairs: set[tuple[int, int]] = set()
    for u in unnamed:
        # a label whose cluster the tree puts in u's group comes first: "looks like 'road'"
        near_named = tree.nearest(u, named)
        if near_named is not None and group_of[near_named[0]] == group_of[u] and near_named[1] >= min_similarity:
            name = next(lab for lab, idx in by_label.items() if near_named[0] in idx)
            out.append(MergeSuggestion(u, tuple(by_label[name]), name, near_named[1]))
            continue
        best = tree.nearest(u, candidates)
        if best is None or best[1] < min_similarity:
            continue
        other, sim = best
        name = next((lab for lab, idx in by_label.items() if other in idx), None)
        if name is not None:
            out.append(MergeSuggestion(u, tuple(by_label[name]), name, sim))
        else:
            pair = (min(u, other), max(u, other))
            if pair in seen_pairs:
                continue
            seen_pairs.add(pair)
            out.append(MergeSuggestion(pair[0], (pair[1],), None, sim))
    out.sort(key=lambda s: (-s.similarity, s.cluster_index))
    return out[: max(0, int(n))]


def accept_suggestion(ctx, run_id: int, cluster_index: int, similar_to: int | None = None,
                      label_name: str | None = None, name: str | None = None) -> list[mapping.ClusterInfo]:
    """Apply a merge suggestion: cluster ``cluster_index`` joins label ``label_name``, or it and
    the unnamed cluster ``similar_to`` become one label called ``name``."""
    if label_name:
        return mapping.name_cluster(ctx, run_id, cluster_index, label_name)
    if similar_to is None:
        raise UserError("a suggestion names a label or a second cluster")
    if not (name or "").strip():
        raise UserError(f"type a name for clusters #{cluster_index} and #{similar_to} first")
    return mapping.merge_clusters(ctx, run_id, [cluster_index, int(similar_to)], name)


def naming_progress(ctx, run_id: int) -> NamingProgress:
    """How much of the corpus is named: clusters and share of pixels."""
    clusters = mapping.list_clusters(ctx, run_id)
    total = sum(c.share for c in clusters) or 1.0
    named = [c for c in clusters if c.label_name and not c.ignored]
    ignored = [c for c in clusters if c.ignored]
    unnamed = [c for c in clusters if c.label_name is None and not c.ignored]
    return NamingProgress(
        n_clusters=len(clusters), n_named=len(named), n_ignored=len(ignored), n_unnamed=len(unnamed),
        n_labels=len({c.label_name.lower() for c in named}),
        named_share=sum(c.share for c in named) / total, ignored_share=sum(c.share for c in ignored) / total,
        unnamed_share=sum(c.share for c in unnamed) / total)


def next_unnamed(ctx, run_id: int, after: int | None = None, order: list[int] | None = None) -> int | None:
    """The next unnamed cluster after ``after`` in ``order`` (default: tree order), wrapping; with
    no ``after``, the largest unnamed cluster (where naming covers the most pixels)."""
    run_dir, clusters = _clusters(ctx, run_id)
    todo = {c.index for c in clusters if c.label_name is None and not c.ignored}
    if not todo:
        return None
    if after is None:
        return max((c for c in clusters if c.index in todo), key=lambda c: (c.pixels, -c.index)).index
    if order is None:
        tree, k = _tree(run_dir)
        order = [int(i) for i in tree.order_] + sorted(c.index for c in clusters if c.index >= k)
    start = order.index(after) + 1 if after in order else 0
    for i in order[start:] + order[:start]:
        if i in todo:
            return i
    return None
