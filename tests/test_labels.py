"""Naming, merging, ignoring clusters; colours, overlays, seed annotations; concurrent edits."""
from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest
from PIL import Image as PILImage
from pycocotools import mask as mask_utils

from stego_app import ingest, projects
from stego_app.labels import annotations, mapping, views
from stego_app.context import create_context
from stego_app.errors import NotFound, UserError
from stego_app.models import RUN_DONE, Cluster, Run, RunImage
from stego_app.render import IGNORED_COLOUR, PALETTE, hex_to_rgb, palette_colour
from tests.conftest import write_scene_images

K = 6
W, H = 64, 48


def _segments(position: int) -> np.ndarray:
    """Cluster map of item `position`: six horizontal bands, shifted per image; cluster 5 only in image 0."""
    seg = np.zeros((H, W), np.uint8)
    bands = [0, 1, 2, 3, 4] if position else [0, 1, 2, 3, 4, 5]
    step = H // len(bands)
    for k, c in enumerate(bands):
        seg[k * step:(k + 1) * step] = c
    seg[len(bands) * step:] = bands[-1]
    return np.roll(seg, position, axis=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def done_run(request, app_config, tmp_path):
    """A finished run in the format core.pipeline writes: 3 images, 6 clusters, raw + CRF maps.

    Once on SQLite and once on PostgreSQL (skipped where PostgreSQL is not installed).
    """
    if request.param == "postgresql":
        app_config.database_url = request.getfixturevalue("postgres_url")
    app_ctx = create_context(app_config)
    request.addfinalizer(app_ctx.close)
    project = projects.create_project(app_ctx, "bands")
    added = ingest.ingest_files(app_ctx, project.id, write_scene_images(tmp_path / "imgs", n=3)).added
    run_dir = app_ctx.config.runs_dir / "synthetic"
    with app_ctx.db.write() as s:
        run = Run(project_id=project.id, status=RUN_DONE, run_dir=str(run_dir), params={"crf": True},
                  n_images=len(added))
        s.add(run)
        s.flush()
        for pos, info in enumerate(added):
            s.add(RunImage(run_id=run.id, position=pos, image_id=info.id))
            seg = _segments(pos)
            for folder, arr in (("segments", seg), ("segments_crf", np.roll(seg, 2, axis=1))):
                (run_dir / folder).mkdir(parents=True, exist_ok=True)
                PILImage.fromarray(arr).save(run_dir / folder / f"{pos:06d}.png")
        for k in range(K):
            s.add(Cluster(run_id=run.id, index=k, pixels=100 * (k + 1), share=(k + 1) / 21,
                          examples=[added[k % 3].id, added[(k + 1) % 3].id], colour=palette_colour(k)))
        run_id = run.id
    return app_ctx, run_id, [i.id for i in added]


def _by_index(clusters):
    return {c.index: c for c in clusters}


def test_initial_clusters_are_unnamed_with_distinct_colours(done_run):
    ctx, run_id, _ = done_run
    cl = mapping.list_clusters(ctx, run_id)
    assert [c.index for c in cl] == list(range(K))
    assert all(c.label_name is None and not c.ignored for c in cl)
    assert len({c.colour for c in cl}) == K
    leg = mapping.legend(ctx, run_id)
    assert [e.name for e in leg] == [f"cluster {i}" for i in range(K)]


def test_name_merge_rename_unmerge(done_run):
    ctx, run_id, _ = done_run
    cl = _by_index(mapping.name_cluster(ctx, run_id, 0, "  sky "))
    assert cl[0].label_name == "sky" and cl[0].colour == PALETTE[0]   # keeps the colour it showed
    # naming another cluster with an existing name merges it (case-insensitive); the toast says so
    assert mapping.naming_note(list(cl.values()), [3], " Sky") == ("1 other cluster already carries 'sky'; "
                                                                  "the label is now spelled 'Sky'.")
    assert mapping.naming_note(list(cl.values()), [3], "sky") == "1 other cluster already carries 'sky': merged."
    assert mapping.naming_note(list(cl.values()), [3], "sky", respelling_only=True) == ""
    assert mapping.naming_note(list(cl.values()), [3], "Sky", respelling_only=True).endswith("spelled 'Sky'.")
    assert mapping.naming_note(list(cl.values()), [0], "SKY") == ""       # renaming the only cluster
    assert mapping.naming_note(list(cl.values()), [3], "road") == ""
    cl = _by_index(mapping.name_cluster(ctx, run_id, 3, "Sky"))
    assert cl[3].label_id == cl[0].label_id and cl[3].colour == cl[0].colour
    assert cl[0].merged_with == (3,) and cl[3].merged_with == (0,)
    leg = {e.name: e for e in mapping.legend(ctx, run_id)}
    assert leg["Sky"].cluster_indices == (0, 3)                    # the name typed last is shown
    assert leg["Sky"].share == pytest.approx(cl[0].share + cl[3].share)
    # a cluster alone under its label renames the label and keeps its colour
    mapping.name_cluster(ctx, run_id, 1, "grass")
    grass_colour = _by_index(mapping.list_clusters(ctx, run_id))[1].colour
    cl = _by_index(mapping.name_cluster(ctx, run_id, 1, "meadow"))
    assert cl[1].label_name == "meadow" and cl[1].colour == grass_colour
    # renaming a merged cluster moves only that cluster to a new label
    cl = _by_index(mapping.name_cluster(ctx, run_id, 3, "cloud"))
    assert cl[0].label_name == "Sky" and cl[3].label_name == "cloud" and cl[0].merged_with == ()
    # rename_label onto an existing name merges the labels
    cl = _by_index(mapping.rename_label(ctx, run_id, "cloud", "SKY"))
    assert cl[3].label_id == cl[0].label_id
    assert {e.name for e in mapping.legend(ctx, run_id)} >= {"SKY", "meadow"}  # new capitalisation kept
    cl = _by_index(mapping.unmerge_cluster(ctx, run_id, 3))
    assert cl[3].label_name is None and cl[0].label_name == "SKY"
    cl = _by_index(mapping.unmerge_cluster(ctx, run_id, 0))
    assert all(c.label_name != "SKY" for c in cl.values())
    assert "SKY" not in {e.name for e in mapping.legend(ctx, run_id)}  # empty labels are removed
    assert len({c.colour for c in cl.values()}) == K


def test_merge_clusters_and_ignore(done_run):
    ctx, run_id, _ = done_run
    cl = _by_index(mapping.merge_clusters(ctx, run_id, [2, 4, 2], "road"))
    assert cl[2].label_id == cl[4].label_id and cl[2].merged_with == (4,)
    cl = _by_index(mapping.ignore_cluster(ctx, run_id, 4))
    assert cl[4].ignored and cl[4].label_name is None and cl[4].colour == IGNORED_COLOUR
    assert cl[2].label_name == "road"
    leg = mapping.legend(ctx, run_id)
    assert leg[-1].name == "ignored" and leg[-1].cluster_indices == (4,)
    cl = _by_index(mapping.ignore_cluster(ctx, run_id, 4, ignored=False))
    assert not cl[4].ignored and cl[4].label_name is None
    # naming an ignored cluster un-ignores it
    mapping.ignore_cluster(ctx, run_id, 5)
    cl = _by_index(mapping.name_cluster(ctx, run_id, 5, "road"))
    assert not cl[5].ignored and cl[5].label_name == "road"


def test_bad_edits_are_refused_and_change_nothing(done_run):
    ctx, run_id, _ = done_run
    mapping.name_cluster(ctx, run_id, 0, "sky")
    mapping.name_cluster(ctx, run_id, 1, "grass")
    before = mapping.list_clusters(ctx, run_id)
    with pytest.raises(UserError, match="empty"):
        mapping.name_cluster(ctx, run_id, 2, "   ")
    with pytest.raises(NotFound, match="no cluster 17"):
        mapping.name_cluster(ctx, run_id, 17, "x")
    with pytest.raises(UserError, match="rrggbb"):
        mapping.set_label_colour(ctx, run_id, "sky", "blue")
    grass = next(c.colour for c in before if c.label_name == "grass")
    with pytest.raises(UserError, match="already the colour of 'grass'"):
        mapping.set_label_colour(ctx, run_id, "sky", grass.upper())
    with pytest.raises(UserError, match="reserved"):
        mapping.set_label_colour(ctx, run_id, "sky", IGNORED_COLOUR)
    with pytest.raises(NotFound):
        mapping.set_label_colour(ctx, run_id, "nothing", "#123456")
    with pytest.raises(UserError, match="at least one"):
        mapping.merge_clusters(ctx, run_id, [], "x")
    assert mapping.list_clusters(ctx, run_id) == before
    with pytest.raises(NotFound):
        mapping.list_clusters(ctx, 999)


def test_run_must_be_done(app_ctx):
    p = projects.create_project(app_ctx, "unfinished")
    with app_ctx.db.write() as s:
        run = Run(project_id=p.id, status="running", params={})
        s.add(run)
        s.flush()
        rid = run.id
    with pytest.raises(UserError, match="running"):
        mapping.name_cluster(app_ctx, rid, 0, "sky")


def test_render_overlay_colours_hidden_and_crf(done_run):
    ctx, run_id, image_ids = done_run
    mapping.name_cluster(ctx, run_id, 0, "sky")
    mapping.set_label_colour(ctx, run_id, "sky", "#ff0000")
    mapping.ignore_cluster(ctx, run_id, 1)
    view = views.render_segmentation(ctx, run_id, image_ids[0], crf=False, opacity=1.0)
    seg = _segments(0)
    assert view.original.shape == (H, W, 3) and view.overlay.shape == (H, W, 3)
    assert np.array_equal(view.segmentation, seg)
    assert (view.overlay[seg == 0] == (255, 0, 0)).all()
    assert (view.overlay[seg == 1] == hex_to_rgb(IGNORED_COLOUR)).all()
    assert not view.crf
    assert {e.name for e in view.legend} == {"sky", "ignored", "cluster 2", "cluster 3", "cluster 4",
                                             "cluster 5"}
    assert sum(e.share for e in view.legend) == pytest.approx(1.0)
    # half opacity blends; hidden clusters keep the original pixels
    half = views.render_segmentation(ctx, run_id, image_ids[0], opacity=0.5, hidden=[0])
    assert np.array_equal(half.overlay[seg == 0], half.original[seg == 0])
    expect = (0.5 * half.original[seg == 2].astype(float) + 0.5 * np.array(hex_to_rgb(PALETTE[2])))
    assert np.abs(half.overlay[seg == 2].astype(float) - expect).max() <= 1
    crf = views.render_segmentation(ctx, run_id, image_ids[0], crf=True)
    assert crf.crf and np.array_equal(crf.segmentation, np.roll(seg, 2, axis=1))
    # image 1 has no cluster 5: it is not in that image's legend
    assert "cluster 5" not in {e.name for e in views.render_segmentation(ctx, run_id, image_ids[1]).legend}
    with pytest.raises(NotFound):
        views.render_segmentation(ctx, run_id, 10_000)


def test_cluster_examples_are_thumbnails(done_run):
    ctx, run_id, image_ids = done_run
    ex = views.cluster_examples(ctx, run_id, 2, n=2, size=32)
    assert [i for i, _ in ex] == [image_ids[2], image_ids[0]]
    assert all(t.dtype == np.uint8 and max(t.shape[:2]) <= 32 for _, t in ex)


def test_examples_of_all_clusters_match_one_by_one_and_unknown_clusters_are_refused(done_run):
    ctx, run_id, _ = done_run
    every = views.examples_of_clusters(ctx, run_id, None, n=2, size=32)
    assert sorted(every) == list(range(K))
    for k in range(K):
        one = views.cluster_examples(ctx, run_id, k, n=2, size=32)
        assert [i for i, _ in one] == [i for i, _ in every[k]]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(one, every[k]))
    with pytest.raises(NotFound, match="no cluster 99"):
        views.examples_of_clusters(ctx, run_id, [0, 99])


def test_render_downscales_large_images_for_display(done_run):
    """max_side: the photo is area-averaged, the cluster map sampled by nearest pixel; the
    legend still counts the full-size map."""
    ctx, run_id, image_ids = done_run
    mapping.name_cluster(ctx, run_id, 0, "sky")
    mapping.set_label_colour(ctx, run_id, "sky", "#ff0000")
    full = views.render_segmentation(ctx, run_id, image_ids[0], opacity=1.0, max_side=None)
    small = views.render_segmentation(ctx, run_id, image_ids[0], opacity=1.0, max_side=32)
    assert small.original.shape == (24, 32, 3) and small.overlay.shape == (24, 32, 3)
    assert np.array_equal(small.segmentation, _segments(0)[1::2, 1::2])   # ids stay ids, no blending
    assert (small.overlay[small.segmentation == 0] == (255, 0, 0)).all()
    area = full.original.reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(small.original.astype(float) - area).max() <= 1
    assert [(e.name, e.share) for e in small.legend] == [(e.name, e.share) for e in full.legend]
    # the default limit leaves small images alone; a nonsense limit is refused
    assert views.render_segmentation(ctx, run_id, image_ids[0]).original.shape == (H, W, 3)
    assert views.render_segmentation(ctx, run_id, image_ids[0], max_side=64).original.shape == (H, W, 3)
    with pytest.raises(UserError, match="display size"):
        views.render_segmentation(ctx, run_id, image_ids[0], max_side=0)


def test_cluster_examples_follow_edits_without_decoding_again(done_run, monkeypatch):
    ctx, run_id, image_ids = done_run
    views._EXAMPLE_CACHE.clear()
    decoded = []
    real = views.load_rgb_fit
    monkeypatch.setattr(views, "load_rgb_fit", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    for k in range(K):
        views.cluster_examples(ctx, run_id, k, n=2, size=64)
    assert len(decoded) == 3                        # each example image decoded once for all clusters

    mapping.name_cluster(ctx, run_id, 0, "sky")
    mapping.set_label_colour(ctx, run_id, "sky", "#ff0000")
    [(first_id, thumb), (second_id, _)] = views.cluster_examples(ctx, run_id, 0, n=2, size=64)
    assert len(decoded) == 3 and (first_id, second_id) == (image_ids[0], image_ids[1])
    rgb = ingest.load_rgb(ctx, image_ids[0]).astype(float)
    mask = _segments(0) == 0
    tinted = 0.55 * rgb + 0.45 * np.array([255.0, 0.0, 0.0])     # the new label colour, rest dimmed
    assert np.abs(thumb[mask] - tinted[mask]).max() <= 1
    assert np.abs(thumb[~mask] - 0.35 * rgb[~mask]).max() <= 1

    # a segment map that changed on disk is read again
    run_dir = ctx.config.runs_dir / "synthetic"
    moved = np.roll(_segments(0), 10, axis=0)
    PILImage.fromarray(moved).save(run_dir / "segments" / "000000.png")
    os.utime(run_dir / "segments" / "000000.png", ns=(1, 1))
    [(_, thumb), _] = views.cluster_examples(ctx, run_id, 0, n=2, size=64)
    assert len(decoded) == 4
    assert np.abs(thumb[moved == 0] - tinted[moved == 0]).max() <= 1


def _decode(ann) -> np.ndarray:
    return mask_utils.decode({"size": ann.rle["size"], "counts": ann.rle["counts"].encode()}).astype(bool)


def test_seed_annotations_follow_the_mapping(done_run):
    ctx, run_id, image_ids = done_run
    assert annotations.seed_annotations(ctx, run_id) == []            # nothing named yet
    mapping.merge_clusters(ctx, run_id, [0, 1], "sky")
    mapping.name_cluster(ctx, run_id, 2, "tree")
    mapping.ignore_cluster(ctx, run_id, 3)
    anns = annotations.seed_annotations(ctx, run_id, crf=False)
    assert {(a.image_id, a.label_name) for a in anns} == {(i, n) for i in image_ids for n in ("sky", "tree")}
    for a in anns:
        pos = image_ids.index(a.image_id)
        seg = _segments(pos)
        expect = np.isin(seg, [0, 1]) if a.label_name == "sky" else seg == 2
        assert np.array_equal(_decode(a), expect)
        assert a.area == int(expect.sum()) and not a.crf and not a.confirmed
        ys, xs = np.nonzero(expect)
        assert a.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    # a mapping change makes the stored rows stale: they are recomputed
    mapping.unmerge_cluster(ctx, run_id, 1)
    sky = [a for a in annotations.seed_annotations(ctx, run_id, image_ids=[image_ids[0]], crf=False)
           if a.label_name == "sky"][0]
    assert np.array_equal(_decode(sky), _segments(0) == 0)
    crf = annotations.seed_annotations(ctx, run_id, image_ids=[image_ids[0]])      # the run's default: CRF
    assert all(a.crf for a in crf)
    assert np.array_equal(_decode([a for a in crf if a.label_name == "sky"][0]),
                          np.roll(_segments(0), 2, axis=1) == 0)


def test_confirm_image(done_run):
    ctx, run_id, image_ids = done_run
    mapping.name_cluster(ctx, run_id, 0, "sky")
    annotations.confirm_image(ctx, run_id, image_ids[1])
    assert views.render_segmentation(ctx, run_id, image_ids[1]).confirmed
    confirmed = annotations.seed_annotations(ctx, run_id, confirmed_only=True)
    assert {a.image_id for a in confirmed} == {image_ids[1]} and all(a.confirmed for a in confirmed)
    assert annotations.confirmed_count(ctx, run_id) == 1
    # confirmation survives a mapping change
    mapping.name_cluster(ctx, run_id, 2, "tree")
    assert {a.label_name for a in annotations.seed_annotations(ctx, run_id, confirmed_only=True)} == {"sky", "tree"}
    annotations.confirm_image(ctx, run_id, image_ids[1], confirmed=False)
    assert annotations.seed_annotations(ctx, run_id, confirmed_only=True) == []
    with pytest.raises(NotFound):
        annotations.confirm_image(ctx, run_id, 10_000)


def test_concurrent_edits_from_many_tabs_lose_nothing(done_run):
    """Threads name different clusters at once: every name lands, the mapping stays consistent."""
    ctx, run_id, _ = done_run
    errors: list[BaseException] = []
    barrier = threading.Barrier(K)

    def tab(i):
        try:
            barrier.wait()
            mapping.name_cluster(ctx, run_id, i, f"class {i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=tab, args=(i,)) for i in range(K)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cl = mapping.list_clusters(ctx, run_id)
    assert [c.label_name for c in cl] == [f"class {i}" for i in range(K)]
    assert len({c.colour for c in cl}) == K
    from stego_app.runs import get_run
    assert get_run(ctx, run_id).mapping_version == K


def test_concurrent_random_edits_keep_the_mapping_consistent(done_run):
    ctx, run_id, _ = done_run
    from stego_app.runs import get_run

    second = create_context(ctx.config)           # another engine, like a second process
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def tab(c, seed):
        rng = random.Random(seed)
        try:
            for _ in range(12):
                op = rng.choice(["name", "merge", "unmerge", "ignore", "rename"])
                if op == "name":
                    mapping.name_cluster(c, run_id, rng.randrange(K), rng.choice(["a", "b", "c"]))
                elif op == "merge":
                    mapping.merge_clusters(c, run_id, rng.sample(range(K), 2), rng.choice(["a", "b", "c"]))
                elif op == "unmerge":
                    mapping.unmerge_cluster(c, run_id, rng.randrange(K))
                elif op == "ignore":
                    mapping.ignore_cluster(c, run_id, rng.randrange(K), rng.random() < 0.7)
                else:
                    try:
                        mapping.rename_label(c, run_id, rng.choice(["a", "b", "c"]), rng.choice(["a", "b", "c"]))
                    except NotFound:
                        continue     # that label does not exist right now: nothing changed
                with lock:
                    done[0] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=tab, args=(c, seed)) for seed, c in enumerate([ctx, ctx, second, second])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second.close()
    assert not errors
    assert get_run(ctx, run_id).mapping_version == done[0]   # every successful edit was applied once
    cl = mapping.list_clusters(ctx, run_id)
    named = [c for c in cl if c.label_id is not None]
    assert all(not c.ignored for c in named)
    leg = mapping.legend(ctx, run_id)
    label_entries = [e for e in leg if e.label_id is not None]
    assert all(e.cluster_indices for e in label_entries)          # no label without clusters
    assert len({e.name.lower() for e in label_entries}) == len(label_entries)
    assert len({e.colour for e in leg}) == len(leg)               # colours unique in the run
    covered = sorted(i for e in leg for i in e.cluster_indices)
    assert covered == list(range(K))                              # each cluster in exactly one entry
