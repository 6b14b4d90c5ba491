"""The command line: the same services as the browser, scriptable, with clear exit codes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from stego_app import cli
from tests.conftest import write_scene_images

ROOT = Path(__file__).resolve().parent.parent


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_subcommands_without_starting_anything():
    proc = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("serve", "ingest", "run", "status", "label", "export", "evaluate"):
        assert cmd in proc.stdout
    assert "--data-dir" in proc.stdout


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["label", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "merge" in out and "ignore" in out and "colour" in out


def test_ingest_status_and_user_errors(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path / "data")]
    folder = tmp_path / "photos"
    write_scene_images(folder / "a", n=2)
    (folder / "junk.txt").write_text("x")
    archive = tmp_path / "more.zip"
    extra = write_scene_images(tmp_path / "zipsrc", n=2, seed=3)
    with zipfile.ZipFile(archive, "w") as zf:
        for p in extra:
            zf.write(p, f"nested/{p.name}")
        zf.writestr("../escape.png", extra[0].read_bytes())
    single = write_scene_images(tmp_path / "single", n=1, seed=9)[0]

    code, out, err = _main(capsys, "ingest", "--project", "streets", str(folder), *data)
    assert code == 2 and "--create" in err
    code, out, err = _main(capsys, *data, "ingest", "--project", "streets", "--create",
                           str(folder), str(archive), str(single))
    assert code == 0, err
    assert "created project" in out
    assert "rejected   junk.txt" in out and "rejected   more.zip: ../escape.png" in out   # named inside its archive
    assert "5 added, 0 duplicates, 2 rejected; 5 images in total" in out
    assert "warning: 2 of 7 files were not added (2 rejected, 0 duplicates)" in err

    # nothing added (a duplicate, a missing file, a text file): exit 2 and say so
    code, out, err = _main(capsys, "ingest", "--project", "streets", str(single),
                           str(tmp_path / "missing.png"), str(folder / "junk.txt"), *data)
    assert code == 2 and "duplicate" in out and "0 added, 1 duplicates, 2 rejected" in out
    assert "error: nothing was added: all 3 files were refused (2 rejected, 1 already" in err
    code, out, err = _main(capsys, "ingest", "--project", "streets", str(tmp_path / "gone.png"), *data)
    assert code == 2 and "rejected   " in out and "gone.png: not found" in out
    assert "nothing was added: all 1 file was refused" in err

    code, out, _ = _main(capsys, "status", "--json", *data)
    assert code == 0
    status = json.loads(out)
    assert status[0]["project"]["name"] == "streets" and status[0]["project"]["n_images"] == 5
    assert status[0]["runs"] == []

    code, _, err = _main(capsys, "label", "42", "list", *data)
    assert code == 2 and "run 42 does not exist" in err
    code, _, err = _main(capsys, "run", "--project", "nope", *data)
    assert code == 2 and "no project" in err
    code, _, err = _main(capsys, "run", "--project", "streets", "--clusters", "1", *data)
    assert code == 2 and "--clusters: Number of clusters 1 must be between 2 and 256" in err


def test_serve_is_the_default_and_passes_settings_to_the_ui(tmp_path, monkeypatch):
    seen = {}
    fake_ui = types.ModuleType("stego_app.ui")

    def launch(ctx):
        from stego_app import projects
        seen["config"] = ctx.config
        seen["projects"] = [p.name for p in projects.list_projects(ctx)]
        seen["worker"] = ctx.worker is not None

    fake_ui.launch = launch
    monkeypatch.setitem(sys.modules, "stego_app.ui", fake_ui)
    import stego_app
    monkeypatch.setattr(stego_app, "ui", fake_ui, raising=False)
    code = cli.main(["--data-dir", str(tmp_path / "data"), "--port", "8123", "--host", "0.0.0.0",
                     "--auth", "team:pw"])
    assert code == 0
    cfg = seen["config"]
    assert (cfg.port, cfg.host, cfg.auth) == (8123, "0.0.0.0", ("team", "pw"))
    assert seen["projects"] == ["Demo"] and seen["worker"]
    seen.clear()
    assert cli.main(["serve", "--data-dir", str(tmp_path / "data2"), "--no-demo"]) == 0
    assert seen["projects"] == []


def test_script_a_whole_labelling_session(tmp_path, capsys, monkeypatch):
    """ingest -> run -> status -> label -> export, all from the command line."""
    data = ["--data-dir", str(tmp_path / "data"), "--backbone", "test_tiny", "--device", "cpu"]
    write_scene_images(tmp_path / "photos", n=4)
    assert _main(capsys, "ingest", "--project", "field", "--create", str(tmp_path / "photos"), *data)[0] == 0

    monkeypatch.setenv("STEGO_PIPELINE_JOBS", "1")
    code, out, err = _main(capsys, "run", "--project", "field", "--resolution", "32", "--clusters", "3",
                           "--steps", "5", "--batch-size", "4", "--code-dim", "8", "--crf-resolution", "24", *data)
    assert code == 0, err
    assert "run 1: done" in out and "training" in out and "100.0%" in out
    # elapsed time of the run on every progress line; a stage's own time (and time left) on the
    # lines of stages a poll caught (a 5-step run can finish between two polls: then none)
    progress_lines = [ln for ln in out.splitlines() if re.match(r"\s+\d+\.\d%", ln)]
    assert progress_lines and all(re.search(r"run \d+:\d\d", ln) for ln in progress_lines), out
    stage_lines = [ln for ln in progress_lines
                   if re.search(r"%\s+(features|knn|training|clustering|segments|crf)\s", ln)]
    assert all(re.search(r"(features|knn|training|clustering|segments|crf) \d+:\d\d.* · run \d+:\d\d", ln)
               for ln in stage_lines), out

    code, out, _ = _main(capsys, "status", "1", *data)
    assert code == 0 and "done" in out and "cluster 2" in out and "test_tiny" in out

    assert _main(capsys, "label", "1", "name", "0", "sky", *data)[0] == 0
    code, out, _ = _main(capsys, "label", "1", "merge", "1", "2", "--name", "ground", *data)
    assert code == 0 and "ground  with 2" in out
    assert _main(capsys, "label", "1", "colour", "ground", "#00aa00", *data)[0] == 0
    code, out, _ = _main(capsys, "label", "1", "list", "--json", *data)
    listed = {c["index"]: c for c in json.loads(out)}
    assert listed[0]["label_name"] == "sky" and listed[2]["colour"] == "#00aa00"
    code, out, _ = _main(capsys, "label", "1", "confirm", "1", "2", *data)
    assert code == 0 and "2 confirmed in total" in out
    code, _, err = _main(capsys, "label", "1", "colour", "sky", "#00AA00", *data)
    assert code == 2 and "already the colour" in err

    code, out, err = _main(capsys, "export", "1", "--confirmed-only", *data)
    assert code == 0, err
    zip_path = Path(out.strip().splitlines()[-1].strip())
    assert zip_path.is_file() and zipfile.is_zipfile(zip_path)
    assert "2 images" in out and "warning" not in err
    # what a person should know about an export is printed (on stderr; stdout ends with the zip)
    code, out, _ = _main(capsys, "label", "1", "kind", *data)
    assert code == 0 and "sky" in out and "stuff  (guessed from the name)" in out
    for name in ("sky", "ground"):                     # things: objects below min-area are left out
        code, out, _ = _main(capsys, "label", "1", "kind", name, "thing", *data)
        assert code == 0
    assert "ground                         thing\n" in out + "\n"
    code, out, err = _main(capsys, "export", "1", "--style", "polygons", "--min-area", "1000000", *data)
    assert code == 0, err
    assert "warning: 4 images got no annotation" in err
    out_zip = out.strip().splitlines()[-1].strip()
    assert Path(out_zip).is_file()

    # the first export, corrected in a tool and imported back (a CVAT-style zip); the empty one refused
    code, out, err = _main(capsys, "label", "1", "import-corrections", str(zip_path), *data)
    assert code == 0 and "2 images corrected from" in out, err
    code, out, err = _main(capsys, "label", "1", "import-corrections", out_zip, *data)
    assert code == 2 and "nothing imported" in err and "it has no annotations" in err
    code, out, _ = _main(capsys, "label", "1", "corrections", *data)
    assert code == 0 and "2 image(s) of run 1 with imported corrections" in out
    assert out.count("not in the refined maps yet; refine with names") == 2
    code, out, _ = _main(capsys, "label", "1", "forget-corrections", "1", *data)
    assert code == 0 and "of 1 image(s) forgotten" in out
    code, out, _ = _main(capsys, "label", "1", "corrections", *data)
    assert "1 image(s) of run 1 with imported corrections" in out

    code, _, err = _main(capsys, "run", "--resume", "1", *data)
    assert code == 2 and "only interrupted, failed or cancelled" in err


def test_evaluate_is_delegated_to_core(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "app.py evaluate" in out and "--images" in out and "--masks" in out


def test_groups_suggestions_find_and_refine_from_the_command_line(tmp_path, capsys, monkeypatch):
    """Over-clustering workflow: groups, name a group, accept a suggestion, find, refine, export."""
    data = ["--data-dir", str(tmp_path / "data"), "--backbone", "test_tiny", "--device", "cpu"]
    write_scene_images(tmp_path / "photos", n=4)
    assert _main(capsys, "ingest", "--project", "field", "--create", str(tmp_path / "photos"), *data)[0] == 0
    monkeypatch.setenv("STEGO_PIPELINE_JOBS", "1")
    code, _, err = _main(capsys, "run", "--project", "field", "--resolution", "40", "--clusters", "8",
                         "--steps", "5", "--batch-size", "4", "--code-dim", "8", "--quiet", *data)
    assert code == 0, err

    code, out, _ = _main(capsys, "label", "1", "groups", "--groups", "3", *data)
    assert code == 0 and "0% of pixels named" in out and out.count("group ") == 3
    code, out, _ = _main(capsys, "label", "1", "name-group", "0", "ground", "--groups", "3", *data)
    assert code == 0 and re.search(r"\d+ (cluster is|clusters are) now 'ground'", out), out
    code, out, _ = _main(capsys, "label", "1", "groups", "--groups", "3", "--json", *data)
    listed = json.loads(out)
    assert listed["groups"][0]["label_names"] == ["ground"] and listed["progress"]["n_named"] >= 1

    code, out, _ = _main(capsys, "label", "1", "suggest", *data)
    assert code == 0 and " 1. #" in out
    first = out.splitlines()[0]
    extra = [] if "looks like" in first else ["--name", "sky"]
    code, out, err = _main(capsys, "label", "1", "suggest", "--accept", "1", *extra, *data)
    assert code == 0 and "accepted" in out, err
    code, _, err = _main(capsys, "label", "1", "suggest", "--accept", "99", *data)
    assert code == 2 and "--accept takes" in err

    code, out, err = _main(capsys, "label", "1", "find", "1", "5", "5", "--threshold", "0.9", "--name", "ball",
                           *data)
    assert code == 0 and "cluster 8 created" in out and "named 'ball'" in out, err

    code, out, err = _main(capsys, "label", "1", "refine", "--steps", "40", "--dense", "--quiet", *data)
    assert code == 0 and "refinement 1: done" in out and "up to date" in out and "finer maps" in out, err

    # Ctrl-C while a refinement runs stops it; the next plain refine says it starts over and how to resume
    def interrupt(_seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(sleep=interrupt))
    code, out, err = _main(capsys, "label", "1", "refine", "--steps", "100000", "--quiet", *data)
    monkeypatch.undo()
    assert code == 4 and "resume with: app.py label 1 refine --resume 2" in out and "refinement 2: cancelled" in out
    monkeypatch.setenv("STEGO_PIPELINE_JOBS", "1")
    code, out, err = _main(capsys, "label", "1", "refine", "--steps", "40", "--quiet", *data)
    assert code == 0 and "refinement 2 stopped (cancelled)" in out and "starts over as refinement 3" in out
    assert "refine --resume 2 continues" in out and "refinement 3: done" in out, err
    code, out, err = _main(capsys, "export", "1", *data)
    assert code == 0 and "refined maps" in out, err
    code, out, err = _main(capsys, "export", "1", "--no-refined", *data)
    assert code == 0 and "raw maps" in out, err      # the run's default: no CRF over the clusters
