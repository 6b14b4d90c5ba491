"""Removing images from a project (services and CLI) keeps the runs that used them readable."""
from __future__ import annotations

import pytest

from core.settings import RunSettings
from stego_app import cli, export, ingest, projects, removal, runs
from stego_app.labels import mapping, views
from stego_app.context import create_context
from stego_app.errors import UserError
from tests.conftest import write_scene_images
from tests.test_runs import FAST, _config


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("removal")
    ctx = create_context(_config(root / "data"))
    project = projects.create_project(ctx, "scenes")
    files = write_scene_images(root / "imgs", n=4)
    ingest.ingest_files(ctx, project.id, files)
    run = runs.wait_for_run(ctx, runs.start_run(ctx, project.id, RunSettings(steps=5, crf=False, **FAST)).id,
                            timeout=300)
    assert run.status == "done", run.error
    extra = write_scene_images(root / "later", n=1, seed=7)
    ingest.ingest_files(ctx, project.id, extra)
    yield ctx, project, run, files, extra[0], root
    ctx.close()


def test_remove_used_and_unused_images(lab):
    ctx, project, run, files, extra, root = lab
    by_name = {i.name: i for i in ingest.list_images(ctx, project.id)}
    used, unused = by_name[files[1].name], by_name[extra.name]
    assert unused.path.is_file() and used.path.is_file()

    report = removal.remove_images(ctx, project.id, [used.id, unused.name, "nope.png"])
    assert report.deleted == [unused.name] and report.kept_for_runs == {used.name: [run.id]}
    assert report.not_found == ["nope.png"] and "stay readable in the run that used them (1)" in report.summary()
    assert not unused.path.exists()                    # nobody needs it: file and row gone
    assert used.path.is_file()                          # the run still needs it
    assert sorted(i.name for i in ingest.list_images(ctx, project.id)) == sorted(
        f.name for f in files if f.name != used.name)
    assert projects.get_project(ctx, project.id).n_images == 3

    # the run that used it stays readable, and says it is stale
    assert removal.removed_in_run(ctx, run.id) == 1
    assert "1 image of this run was removed" in removal.stale_note(1)
    view = views.render_segmentation(ctx, run.id, used.id)
    assert view.overlay.shape[:2] == view.original.shape[:2]
    mapping.name_cluster(ctx, run.id, 0, "thing")
    info = export.export_run(ctx, run.id)                        # the removed image is left out
    assert info.status == "done" and info.n_images == 3
    info = export.export_run(ctx, run.id, export.ExportOptions(removed_images=True))
    assert info.status == "done" and info.n_images == 4          # unless asked for

    # a new run leaves it out
    new = runs.start_run(ctx, project.id, RunSettings(steps=1000, crf=False, **FAST))
    assert new.n_images == 3 and used.id not in {r.image_id for r in runs.run_images(ctx, new.id)}
    runs.cancel_run(ctx, new.id)
    runs.wait_for_run(ctx, new.id, timeout=120)

    with pytest.raises(UserError, match="no such image"):
        removal.remove_images(ctx, project.id, [used.id])      # already removed
    # adding it again brings it back (not a "duplicate" of an image nobody can see)
    again = ingest.ingest_files(ctx, project.id, [files[1]])
    assert [i.name for i in again.added] == [used.name] and not again.duplicates
    assert removal.removed_in_run(ctx, run.id) == 0
    assert projects.get_project(ctx, project.id).n_images == 4


def test_cli_lists_and_removes_images(lab, capsys):
    ctx, project, run, files, extra, root = lab
    data = ["--data-dir", str(ctx.config.data_dir), "--backbone", "test_tiny"]
    assert cli.main(["images", "--project", "scenes", *data]) == 0
    out = capsys.readouterr().out
    assert files[2].name in out and "project 'scenes': 4 images" in out
    assert cli.main(["remove", "--project", "scenes", files[2].name, *data]) == 0
    out = capsys.readouterr().out
    assert f"removed    {files[2].name} (kept readable for run {run.id}" in out and "3 images left" in out
    assert cli.main(["status", str(run.id), *data]) == 0
    assert "stale: 1 image of this run was removed" in capsys.readouterr().out
    assert cli.main(["remove", "--project", "scenes", "ghost.png", *data]) == 2
    assert "no such image in this project: ghost.png" in capsys.readouterr().err
