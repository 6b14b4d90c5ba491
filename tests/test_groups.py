"""stego_app.groups: groups of similar clusters, group naming, merge suggestions, progress."""
from __future__ import annotations

import numpy as np
import pytest

from stego_app import groups, projects
from stego_app.errors import NotFound, UserError
from stego_app.labels import mapping
from stego_app.models import RUN_DONE, Cluster, Run
from stego_app.render import palette_colour
from tests.test_hierarchy import planted_centroids


@pytest.fixture
def grouped_run(app_ctx):
    """A finished run with 12 clusters whose centroids come from 3 planted classes (4 each)."""
    cents, truth = planted_centroids(n_classes=3, per_class=4, dim=16, seed=1)
    project = projects.create_project(app_ctx, "over-clustered")
    run_dir = app_ctx.config.runs_dir / "grouped"
    run_dir.mkdir(parents=True)
    np.save(run_dir / "centroids.npy", cents.astype(np.float32))
    with app_ctx.db.write() as s:
        run = Run(project_id=project.id, status=RUN_DONE, run_dir=str(run_dir), params={}, n_images=0)
        s.add(run)
        s.flush()
        for k in range(12):
            s.add(Cluster(run_id=run.id, index=k, pixels=10 * (k + 1), share=(k + 1) / 78, examples=[],
                          colour=palette_colour(k)))
        run_id = run.id
    return app_ctx, run_id, truth


def test_groups_hold_one_class_each_and_name_in_one_action(grouped_run):
    ctx, run_id, truth = grouped_run
    gs = groups.list_groups(ctx, run_id, n_groups=3)
    assert [g.id for g in gs] == [0, 1, 2]
    assert all(len(set(truth[list(g.cluster_indices)])) == 1 and len(g.cluster_indices) == 4 for g in gs)
    assert abs(sum(g.share for g in gs) - 1.0) < 1e-9
    assert len(groups.list_groups(ctx, run_id)) == 3          # default: ~K/4 groups

    before = mapping.list_clusters(ctx, run_id)[0].colour
    clusters = groups.name_group(ctx, run_id, gs[1].id, "road", n_groups=3)
    road = {c.index for c in clusters if c.label_name == "road"}
    assert road == set(gs[1].cluster_indices)
    g1 = groups.list_groups(ctx, run_id, 3)[1]
    assert g1.label_names == ("road",) and g1.unnamed == () and abs(g1.named_share - g1.share) < 1e-9
    assert mapping.list_clusters(ctx, run_id)[0].colour == before or 0 in road

    progress = groups.naming_progress(ctx, run_id)
    assert (progress.n_named, progress.n_unnamed, progress.n_labels) == (4, 8, 1)
    assert abs(progress.named_share - g1.share) < 1e-9
    assert "of pixels named" in progress.text

    with pytest.raises(UserError, match="no unnamed cluster"):
        groups.name_group(ctx, run_id, g1.id, "street", n_groups=3)
    # only_unnamed=False renames the whole group
    clusters = groups.name_group(ctx, run_id, g1.id, "street", n_groups=3, only_unnamed=False)
    assert {c.index for c in clusters if c.label_name == "street"} == road
    with pytest.raises(NotFound):
        groups.name_group(ctx, run_id, 7, "x", n_groups=3)
    with pytest.raises(UserError, match="between 1 and 12"):
        groups.list_groups(ctx, run_id, 13)


def test_merge_suggestions_point_at_the_same_class_and_can_be_accepted(grouped_run):
    ctx, run_id, truth = grouped_run
    first = [i for i in range(12) if truth[i] == truth[0]]
    mapping.name_cluster(ctx, run_id, first[0], "sky")
    sugg = groups.merge_suggestions(ctx, run_id, n=20)
    assert sugg and [s.similarity for s in sugg] == sorted((s.similarity for s in sugg), reverse=True)
    for s in sugg:
        assert mapping.list_clusters(ctx, run_id)[s.cluster_index].label_name is None
        assert all(truth[j] == truth[s.cluster_index] for j in s.similar_to)
    to_sky = [s for s in sugg if s.label_name == "sky"]
    assert to_sky and "looks like 'sky'" in to_sky[0].text
    groups.accept_suggestion(ctx, run_id, to_sky[0].cluster_index, label_name="sky")
    assert mapping.list_clusters(ctx, run_id)[to_sky[0].cluster_index].label_name == "sky"

    pair = next(s for s in groups.merge_suggestions(ctx, run_id, 20) if s.label_name is None)
    with pytest.raises(UserError, match="type a name"):
        groups.accept_suggestion(ctx, run_id, pair.cluster_index, similar_to=pair.similar_to[0])
    groups.accept_suggestion(ctx, run_id, pair.cluster_index, similar_to=pair.similar_to[0], name="grass")
    named = {c.index for c in mapping.list_clusters(ctx, run_id) if c.label_name == "grass"}
    assert named == {pair.cluster_index, pair.similar_to[0]}
    # ignored clusters are never suggested
    mapping.ignore_cluster(ctx, run_id, 11)
    assert all(11 != s.cluster_index and 11 not in s.similar_to for s in groups.merge_suggestions(ctx, run_id, 20))


def test_next_unnamed_starts_at_the_largest_then_walks_the_tree_order_and_wraps(grouped_run):
    ctx, run_id, _ = grouped_run
    order = [g for grp in groups.list_groups(ctx, run_id, 3) for g in grp.cluster_indices]
    largest = max(mapping.list_clusters(ctx, run_id), key=lambda c: c.pixels)
    assert groups.next_unnamed(ctx, run_id) == largest.index     # naming starts where it covers the most
    mapping.name_cluster(ctx, run_id, order[1], "a")
    assert groups.next_unnamed(ctx, run_id, after=order[0]) == order[2]
    assert groups.next_unnamed(ctx, run_id, after=order[-1]) == order[0]
    for i in order:
        mapping.ignore_cluster(ctx, run_id, i)
    assert groups.next_unnamed(ctx, run_id) is None
