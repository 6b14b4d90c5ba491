"""A run's cluster -> label mapping: reading it and editing it (names, merges, ignores, colours).

Labels belong to one run (name unique per run, case-insensitive). Each cluster is
either unnamed, mapped to exactly one label (several clusters -> one label = merged),
or ignored (void). Every edit is one write transaction that locks the run, re-reads
the current mapping, applies the edit, deletes labels left without clusters and
bumps Run.mapping_version, so concurrent edits from several tabs are serialised and
none is lost.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sqlalchemy import select

from core.rundir import RunDir
from stego_app import edit_versions
from stego_app.db import lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import RUN_DONE, Cluster, Correction, Label, Run
from stego_app.projects import clean_name
from stego_app.render import IGNORED_COLOUR, first_free_colour, normalise_hex

log = logging.getLogger(__name__)

MAX_LABEL_NAME = 100


@dataclass(frozen=True)
class ClusterInfo:
    index: int
    pixels: int
    share: float
    example_image_ids: tuple[int, ...]
    colour: str
    label_id: int | None
    label_name: str | None
    ignored: bool
    merged_with: tuple[int, ...]


@dataclass(frozen=True)
class LegendEntry:
    name: str
    colour: str
    share: float
    cluster_indices: tuple[int, ...]
    label_id: int | None
    ignored: bool




# ---------------------------------------------------------------- reading the mapping

@dataclass(frozen=True)
class Mapping:
    """A snapshot of a run's clusters and labels (taken inside one transaction)."""

    run_id: int
    version: int
    run_dir: Path
    has_crf: bool
    crf_default: bool
    clusters: tuple[ClusterInfo, ...]
    labels: dict[int, tuple[str, str]]     # label id -> (name, colour)

    def colours(self) -> dict[int, str]:
        return {c.index: c.colour for c in self.clusters}

    def label_clusters(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for c in self.clusters:
            if c.label_id is not None and not c.ignored:
                out[c.label_id].append(c.index)
        return dict(out)


def get_done_run(s, run_id: int, lock: bool = False, needs: str = "clusters can be named once it is done") -> Run:
    """The finished run ``run_id``; NotFound, or a UserError ending with ``needs`` (what waits for it)."""
    run = lock_for_update(s, Run, run_id) if lock else s.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if run.status != RUN_DONE:
        raise UserError(f"run {run_id} is {run.status}; {needs}")
    return run


def _cluster_rows(s, run_id: int) -> list[Cluster]:
    return list(s.scalars(select(Cluster).where(Cluster.run_id == run_id).order_by(Cluster.index)))


def _display_colours(clusters: Sequence[Cluster], labels: dict[int, Label]) -> dict[int, str]:
    """Colour per cluster index: label colour, ignored grey, or a colour no label uses."""
    used = {lab.colour for lab in labels.values()}
    out: dict[int, str] = {}
    for c in clusters:
        if c.ignored:
            out[c.index] = IGNORED_COLOUR
        elif c.label_id is not None and c.label_id in labels:
            out[c.index] = labels[c.label_id].colour
    for c in clusters:
        if c.index in out:
            continue
        colour = c.colour if c.colour not in used else first_free_colour(used, start=c.index)
        out[c.index] = colour
        used.add(colour)
    return out


def corrected_label_ids(s, run_id: int) -> set[int]:
    """Labels that imported corrections of the run use (kept even when no cluster carries them)."""
    return set(s.scalars(select(Correction.label_id).where(Correction.run_id == run_id).distinct()))


def carried_label_ids(s, run_id: int) -> set[int]:
    """Labels some cluster of the run carries."""
    return set(s.scalars(select(Cluster.label_id).where(Cluster.run_id == run_id, Cluster.label_id.is_not(None))))


def prune_labels(s, run_id: int) -> None:
    """Delete the run's labels that no cluster carries and no correction uses any more."""
    keep = carried_label_ids(s, run_id) | corrected_label_ids(s, run_id)
    for lab in s.scalars(select(Label).where(Label.run_id == run_id)).all():
        if lab.id not in keep:
            s.delete(lab)


def snapshot(s, run: Run) -> Mapping:
    clusters = _cluster_rows(s, run.id)
    labels = {lab.id: lab for lab in s.scalars(select(Label).where(Label.run_id == run.id))}
    colours = _display_colours(clusters, labels)
    by_label: dict[int, list[int]] = defaultdict(list)
    for c in clusters:
        if c.label_id is not None:
            by_label[c.label_id].append(c.index)
    infos = tuple(
        ClusterInfo(index=c.index, pixels=c.pixels, share=c.share,
                    example_image_ids=tuple(int(i) for i in (c.examples or [])),
                    colour=colours[c.index], label_id=c.label_id,
                    label_name=labels[c.label_id].name if c.label_id in labels else None,
                    ignored=c.ignored,
                    merged_with=tuple(i for i in by_label.get(c.label_id, []) if i != c.index)
                    if c.label_id is not None else ())
        for c in clusters)
    run_dir = Path(run.run_dir)
    return Mapping(run_id=run.id, version=run.mapping_version, run_dir=run_dir,
                    has_crf=RunDir(run_dir).has_segments("crf"),
                    crf_default=bool((run.params or {}).get("crf", True)),
                    clusters=infos, labels={k: (v.name, v.colour) for k, v in labels.items()})


def read_mapping(ctx, run_id: int) -> Mapping:
    with ctx.db.read() as s:
        return snapshot(s, get_done_run(s, run_id))


def list_clusters(ctx, run_id: int) -> list[ClusterInfo]:
    """The run's clusters in index order with their current mapping and colour."""
    return list(read_mapping(ctx, run_id).clusters)


def legend_entries(mapping: Mapping, shares: dict[int, float] | None = None) -> list[LegendEntry]:
    share = shares if shares is not None else {c.index: c.share for c in mapping.clusters}
    entries: list[LegendEntry] = []
    for label_id, (name, colour) in sorted(mapping.labels.items(), key=lambda kv: kv[1][0].lower()):
        idx = tuple(c.index for c in mapping.clusters if c.label_id == label_id and not c.ignored)
        if idx:
            entries.append(LegendEntry(name=name, colour=colour, share=sum(share.get(i, 0.0) for i in idx),
                                       cluster_indices=idx, label_id=label_id, ignored=False))
    for c in mapping.clusters:
        if c.label_id is None and not c.ignored:
            entries.append(LegendEntry(name=f"cluster {c.index}", colour=c.colour,
                                       share=share.get(c.index, 0.0), cluster_indices=(c.index,),
                                       label_id=None, ignored=False))
    ignored = tuple(c.index for c in mapping.clusters if c.ignored)
    if ignored:
        entries.append(LegendEntry(name="ignored", colour=IGNORED_COLOUR,
                                   share=sum(share.get(i, 0.0) for i in ignored),
                                   cluster_indices=ignored, label_id=None, ignored=True))
    return entries


def legend(ctx, run_id: int) -> list[LegendEntry]:
    """Labels (by name), then unnamed clusters, then one 'ignored' entry; shares over the corpus."""
    return legend_entries(read_mapping(ctx, run_id))


# ---------------------------------------------------------------- edits

class _Edit:
    """One serialised edit of a run's mapping (a write transaction)."""

    def __init__(self, ctx, run_id: int):
        self.ctx, self.run_id = ctx, run_id
        # a label created by this edit, with the (old label id, own colour) of the clusters it took
        self._new_colour_for: tuple[Label, list[tuple[int | None, str]]] | None = None

    def __enter__(self):
        self._cm = self.ctx.db.write()
        self.s = self._cm.__enter__()
        try:
            self.run = get_done_run(self.s, self.run_id, lock=True)
            edit_versions.check(self.run_id, self.run.mapping_version)   # a stale page's edit is refused
            self.clusters = {c.index: c for c in _cluster_rows(self.s, self.run_id)}
            self.labels = {lab.id: lab for lab in self.s.scalars(select(Label).where(Label.run_id == self.run_id))}
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, et, ev, tb):
        return self._cm.__exit__(et, ev, tb)

    def cluster(self, index: int) -> Cluster:
        try:
            return self.clusters[int(index)]
        except (KeyError, ValueError, TypeError):
            raise NotFound(f"run {self.run_id} has no cluster {index} "
                           f"(clusters are 0..{len(self.clusters) - 1})") from None

    def label_named(self, name: str) -> Label | None:
        key = name.lower()
        return next((lab for lab in self.labels.values() if lab.name.lower() == key), None)

    def new_label(self, name: str, moved: Sequence[Cluster]) -> Label:
        lab = Label(run_id=self.run_id, name=name, colour="#000000")
        self.s.add(lab)
        self.s.flush()
        self.labels[lab.id] = lab
        self._new_colour_for = (lab, [(c.label_id, c.colour) for c in moved])
        return lab

    def assign(self, cluster: Cluster, label: Label | None) -> None:
        cluster.label_id = label.id if label is not None else None
        if label is not None:
            cluster.ignored = False

    def finish(self) -> list[ClusterInfo]:
        """Delete empty labels, colour a new label, bump the version, return the mapping.

        A label no cluster carries any more is kept while imported corrections use it (their
        masks stay, unused, and naming a cluster with that name again brings them back)."""
        self.s.flush()
        in_use = {c.label_id for c in self.clusters.values() if c.label_id is not None}
        kept = corrected_label_ids(self.s, self.run_id)
        emptied = [lab for lid, lab in self.labels.items() if lid not in in_use and lid not in kept]
        pending = self._new_colour_for
        for lab in emptied:
            self.s.delete(lab)
            del self.labels[lab.id]
        if pending is not None:          # a new label: reuse a colour the person already saw
            lab, previous = pending
            taken = {other.colour for other in self.labels.values() if other.id != lab.id}
            emptied_colours = {e.id: e.colour for e in emptied}
            candidates = [emptied_colours[lid] for lid, _ in previous if lid in emptied_colours]
            candidates += [own for _, own in previous]
            unnamed = {c.colour for c in self.clusters.values() if c.label_id is None}
            lab.colour = next((c for c in candidates if c not in taken),
                              first_free_colour(taken | unnamed))
        self.run.mapping_version += 1
        self.s.flush()
        return list(snapshot(self.s, self.run).clusters)


def naming_note(clusters: Sequence[ClusterInfo], indices: Sequence[int], name: str,
                respelling_only: bool = False) -> str:
    """What giving clusters ``indices`` the label ``name`` does to other clusters, for a toast: joining
    an existing label (names match case-insensitively) and respelling it; "" when it does neither
    (with ``respelling_only``, also when it joins without respelling)."""
    clean = " ".join((name or "").split())
    chosen = set(int(i) for i in indices)
    others = [c for c in clusters if c.index not in chosen and c.label_name
              and c.label_name.casefold() == clean.casefold()]
    if not others:
        return ""
    old = others[0].label_name
    n = len(others)
    said = f"{n} other cluster{'s' if n != 1 else ''} already carr{'y' if n != 1 else 'ies'} '{old}'"
    if old != clean:
        return f"{said}; the label is now spelled '{clean}'."
    return "" if respelling_only else f"{said}: merged."


def name_cluster(ctx, run_id: int, cluster_index: int, name: str) -> list[ClusterInfo]:
    """Give a cluster a label. An existing label's name merges the cluster into that label;
    a cluster alone under its label renames the label (keeping its colour)."""
    name = clean_name(name, "label name", MAX_LABEL_NAME)
    with _Edit(ctx, run_id) as e:
        c = e.cluster(cluster_index)
        target = e.label_named(name)
        current = e.labels.get(c.label_id) if c.label_id is not None else None
        if target is not None:                           # the name typed last sets the capitalisation
            target.name = name
            e.assign(c, target)
        elif current is not None and all(o.label_id != current.id for o in e.clusters.values() if o is not c):
            current.name = name                          # alone under its label: rename it
        else:
            e.assign(c, e.new_label(name, [c]))
        return e.finish()


def rename_label(ctx, run_id: int, old_name: str, new_name: str) -> list[ClusterInfo]:
    """Rename a label; if the new name is another label's, the two labels are merged."""
    new_name = clean_name(new_name, "label name", MAX_LABEL_NAME)
    with _Edit(ctx, run_id) as e:
        label = e.label_named(" ".join((old_name or "").split()))
        if label is None:
            raise NotFound(f"run {run_id} has no label named {old_name!r}")
        target = e.label_named(new_name)
        if target is None or target.id == label.id:
            label.name = new_name
        else:
            target.name = new_name
            for c in e.clusters.values():
                if c.label_id == label.id:
                    e.assign(c, target)
        return e.finish()


def merge_clusters(ctx, run_id: int, cluster_indices: Sequence[int], name: str) -> list[ClusterInfo]:
    """Map all given clusters to one label `name` (existing or new)."""
    name = clean_name(name, "label name", MAX_LABEL_NAME)
    indices = list(dict.fromkeys(int(i) for i in cluster_indices))
    if not indices:
        raise UserError("choose at least one cluster to merge")
    with _Edit(ctx, run_id) as e:
        moved = [e.cluster(i) for i in indices]
        target = e.label_named(name)
        if target is None:
            target = e.new_label(name, moved)
        else:
            target.name = name
        for c in moved:
            e.assign(c, target)
        return e.finish()


def unmerge_cluster(ctx, run_id: int, cluster_index: int) -> list[ClusterInfo]:
    """Take a cluster out of its label: it is its own unnamed entry again."""
    with _Edit(ctx, run_id) as e:
        c = e.cluster(cluster_index)
        c.label_id = None
        c.ignored = False
        return e.finish()


def ignore_cluster(ctx, run_id: int, cluster_index: int, ignored: bool = True) -> list[ClusterInfo]:
    """Mark a cluster as void (its label is dropped) or bring it back as unnamed."""
    with _Edit(ctx, run_id) as e:
        c = e.cluster(cluster_index)
        if ignored:
            c.label_id = None
            c.ignored = True
        else:
            c.ignored = False
        return e.finish()


def set_label_colour(ctx, run_id: int, label_name: str, colour: str) -> list[ClusterInfo]:
    """Change a label's colour ("#rrggbb"); colours stay unique within the run."""
    try:
        colour = normalise_hex(colour)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if colour == IGNORED_COLOUR:
        raise UserError(f"{colour} is reserved for ignored clusters; choose another colour")
    with _Edit(ctx, run_id) as e:
        label = e.label_named(" ".join((label_name or "").split()))
        if label is None:
            raise NotFound(f"run {run_id} has no label named {label_name!r}")
        in_use = {c.label_id for c in e.clusters.values()}
        clash = next((lab for lab in e.labels.values()
                      if lab.id != label.id and lab.id in in_use and lab.colour == colour), None)
        if clash is not None:
            raise UserError(f"{colour} is already the colour of {clash.name!r}")
        label.colour = colour
        return e.finish()
