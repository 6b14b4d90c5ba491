"""Over-clustering in the browser: a 40-cluster run named quickly, refined with names, click-to-find.

Real Chromium (Playwright) against `app.py serve` with the tiny test backbone. The run is made
with the CLI first (same data folder), so this file is about the naming workflow: quick naming
with Enter (focus moves to the next unnamed cluster), naming a whole group, accepting a merge
suggestion, refining with names (background job), finding more of a thing by clicking, and an
export that says it used the refined maps. Screenshots of the Clusters and Explore views go to
$STEGO_UI_SCREENSHOT_DIR when set.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from core.rundir import RunDir
from tests import test_ui_browser as _shared
from tests.test_ui_browser import (
    BACKBONE,
    MISSING,
    ROOT,
    AppServer,
    choose,
    close_toasts,
    expect,
    field,
    open_accordion,
    scene,
    shoot,
    tab,
)

# the shared fixtures (they use this module's `app`)
browser, db, page, shots = _shared.browser, _shared.db, _shared.page, _shared.shots

if MISSING:   # test_ui_browser decides whether a missing browser skips or fails (CI)
    pytest.skip("; ".join(MISSING), allow_module_level=True)

pytestmark = [pytest.mark.timeout(900)]
K = 40


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("naming")
    photos = base / "photos"
    photos.mkdir()
    for i in range(12):
        scene(200 + i).save(photos / f"street_{i}.png")
    data = base / "data"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", STEGO_PIPELINE_JOBS="1")
    common = ["--data-dir", str(data), "--backbone", BACKBONE, "--device", "cpu"]
    for cmd in (["ingest", "--project", "Streets", "--create", str(photos)],
                ["run", "--project", "Streets", "--clusters", str(K), "--resolution", "96", "--steps", "30",
                 "--batch-size", "4", "--code-dim", "16", "--crf-resolution", "60", "--quiet"]):
        proc = subprocess.run([sys.executable, str(ROOT / "app.py"), *cmd, *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    server = AppServer(data, ["--backbone", BACKBONE, "--no-demo"], base / "app.log")
    server.start()
    yield server
    server.stop()
    assert "Traceback" not in server.log_text(), server.log_text()[-6000:]


def settle(page) -> None:
    """Wait until no Gradio component is still updating (so screenshots show the final state)."""
    expect(page.locator(".pending, .generating")).to_have_count(0, timeout=60_000)
    page.wait_for_timeout(500)


def labelled(db):
    return {i: name for i, name in db('SELECT c."index", l.name FROM clusters c LEFT JOIN labels l '
                                      'ON c.label_id = l.id WHERE c.run_id = 1')}


def download_coco(page, target) -> dict:
    """Download the shown export to ``target`` and return its COCO instances JSON."""
    with page.expect_download() as dl:
        page.locator("#btn-download").click()
    dl.value.save_as(target)
    with zipfile.ZipFile(target) as zf:
        return json.loads(zf.read("annotations/instances_default.json"))


def focus_index(page) -> int:
    return int(page.locator("#quick-focus-inner").get_attribute("data-cluster"))


def test_01_forty_clusters_shown_in_groups_with_progress(page, db):
    expect(field(page, "run-select")).to_have_value(re.compile(r"Run 1 · Finished"), timeout=30_000)
    tab(page, "Clusters")
    expect(page.locator("#clusters-html .stego-card")).to_have_count(K, timeout=60_000)
    expect(page.locator("#clusters-html .stego-group")).to_have_count(10)          # ~K/4 groups
    expect(page.locator("#naming-progress")).to_contain_text("0% of pixels named")
    expect(page.locator("#naming-progress")).to_contain_text(f"0 of {K} clusters")
    assert page.locator("#clusters-html .stego-card-examples img").count() >= K


def test_02_type_a_name_press_enter_and_the_next_cluster_comes_up(page, db):
    first = focus_index(page)
    box = field(page, "quick-name")
    box.fill("sky")
    box.press("Enter")
    expect(page.locator(f'#clusters-html .stego-card[data-cluster="{first}"]')).to_have_attribute(
        "data-label", "sky", timeout=30_000)
    expect(page.locator("#quick-focus-inner")).not_to_have_attribute("data-cluster", str(first))
    second = focus_index(page)
    assert labelled(db)[first] == "sky" and labelled(db)[second] is None
    expect(box).to_have_value("")
    # the text box keeps the keyboard: the next name is typed straight away
    assert page.evaluate("document.activeElement && document.activeElement.closest('#quick-name') !== null")
    page.keyboard.type("road")
    page.keyboard.press("Enter")
    expect(page.locator(f'#clusters-html .stego-card[data-cluster="{second}"]')).to_have_attribute(
        "data-label", "road", timeout=30_000)
    expect(page.locator("#naming-progress")).to_contain_text(f"2 of {K} clusters")


def test_03_name_a_whole_group_in_one_action(page, db):
    close_toasts(page)
    group = page.locator('#clusters-html .stego-group[data-group="3"]')
    members = [int(x) for x in group.locator(".stego-card").evaluate_all("els => els.map(e => e.dataset.cluster)")]
    unnamed = [i for i in members if labelled(db)[i] is None]
    assert unnamed
    choose(page, "group-select", "group 3 ·")
    name_box = field(page, "group-name")
    name_box.fill("grass")
    name_box.press("Enter")
    for i in unnamed:
        expect(page.locator(f'#clusters-html .stego-card[data-cluster="{i}"]')).to_have_attribute(
            "data-label", "grass", timeout=30_000)
    assert all(labelled(db)[i] == "grass" for i in unnamed)
    expect(group.locator(".stego-group-head")).to_contain_text("labels: grass")
    share = float(page.locator("#naming-progress-inner").get_attribute("data-named"))
    assert share > 0


def test_04_accept_a_merge_suggestion(page, db, shots):
    close_toasts(page)
    radio = page.locator("#merge-suggestions label").first
    text = radio.inner_text()
    m = re.match(r"#(\d+)", text)
    assert m, text
    idx = int(m.group(1))
    radio.click()
    if "looks like" in text:
        wanted = re.search(r"looks like '([^']+)'", text).group(1)
    else:
        wanted = "kerb"
        field(page, "suggestion-name").fill(wanted)
    page.locator("#btn-accept-suggestion").click()
    expect(page.locator(f'#clusters-html .stego-card[data-cluster="{idx}"]')).to_have_attribute(
        "data-label", wanted, timeout=30_000)
    assert labelled(db)[idx] == wanted
    settle(page)
    shoot(page, shots / "clusters_groups.png")


def test_05_refine_with_names_in_the_background(page, db, app):
    close_toasts(page)
    tab(page, "Explore")                        # an image shown before the refined maps exist
    page.locator("#explore-gallery .thumbnail-item").nth(2).click()
    expect(field(page, "explore-image")).to_have_value("street_10.png")
    expect(page.locator("#explore-maps")).to_have_attribute("data-maps", re.compile("raw clusters|CRF-refined"),
                                                            timeout=30_000)
    tab(page, "Clusters")
    expect(page.locator("#btn-refine-cancel")).to_be_disabled()     # no refinement yet: nothing to cancel
    expect(page.locator("#btn-refine-resume")).to_be_disabled()
    field(page, "refine-steps").fill("150")     # the default (1000) is for real corpora
    page.locator("#refine-dense input[type=checkbox]").check()     # finer maps: tokens twice as dense
    page.locator("#btn-refine").click()
    box = page.locator("#refine-status-box")
    expect(box).to_have_attribute("data-status", re.compile("queued|running|done"), timeout=30_000)
    if box.get_attribute("data-status") != "done":      # one refinement at a time: no second click meanwhile
        expect(page.locator("#btn-refine")).to_be_disabled()
    expect(box).to_have_attribute("data-status", "done", timeout=300_000)
    expect(page.locator("#btn-refine")).to_be_enabled()     # done: refining again after more naming
    expect(box).to_contain_text("up to date with the names")
    expect(box).to_contain_text("finer maps")
    expect(page.locator("#btn-refine-cancel")).to_be_disabled()     # finished: nothing to cancel or resume
    expect(page.locator("#btn-refine-resume")).to_be_disabled()
    (status, version), = db("SELECT status, mapping_version FROM refinements WHERE run_id = 1")
    assert status == "done"
    rd = RunDir(db("SELECT run_dir FROM runs WHERE id = 1")[0][0])
    meta = json.loads(rd.refined_meta_json.read_text())
    assert meta["mapping_version"] == version and len(list(rd.segments_dir("refined").glob("*.png"))) == 12
    assert meta["settings"]["dense"] is True


def test_06_click_to_find_makes_a_new_cluster(page, db, shots):
    close_toasts(page)
    tab(page, "Explore")                         # opening the tab shows the maps refined meanwhile
    expect(page.locator("#explore-maps")).to_have_attribute("data-maps", "refined with names", timeout=30_000)
    page.locator("#explore-gallery .thumbnail-item").nth(0).click()
    page.locator("#explore-gallery .thumbnail-item").nth(1).click()       # open an image again: refined maps
    expect(field(page, "explore-image")).to_have_value("street_1.png")    # the last click wins
    expect(page.locator("#explore-maps")).to_have_attribute("data-maps", "refined with names", timeout=30_000)
    settle(page)                                                          # street_1 drawn before clicking it
    img = page.locator("#explore-original img")
    expect(img).to_be_visible()
    bbox = img.bounding_box()
    img.click(position={"x": bbox["width"] * 0.5, "y": bbox["height"] * 0.15})      # the sky
    expect(page.locator("#find-heat img")).to_be_visible(timeout=60_000)
    expect(page.locator("#find-info")).to_contain_text("of all pixels reach")
    assert page.locator("#find-matches .thumbnail-item").count() >= 1
    field(page, "find-name").fill("sky")
    page.locator("#btn-find-create").click()
    expect(page.locator(".toast-body").filter(has_text=f"Cluster #{K} made")).to_be_visible(timeout=30_000)
    assert labelled(db)[K] == "sky"
    settle(page)
    shoot(page, shots / "explore_find.png")


def test_07_export_uses_the_refined_maps_and_says_so(page, db, shots, tmp_path):
    close_toasts(page)
    tab(page, "Export")
    page.locator("#btn-export").click()
    summary = page.locator("#export-summary")
    expect(summary).to_contain_text("Segment maps used: refined", timeout=120_000)
    expect(summary).to_contain_text("made before the latest naming changes")   # a cluster was found since
    target = tmp_path / "export.zip"
    coco = download_coco(page, target)
    assert coco["info"]["maps"] == "refined"
    assert {"sky", "road", "grass"} <= {c["name"] for c in coco["categories"]}
    options = json.loads(db("SELECT options FROM exports ORDER BY id DESC LIMIT 1")[0][0])
    assert options["refined_used"] is True

    # the team corrects images in their tool and brings them back: here the export itself, as a CVAT zip
    close_toasts(page)
    tab(page, "Clusters")
    page.locator("#corrections").get_by_text("Import corrected annotations").first.click()
    page.locator("#corrections-file input[type=file]").set_input_files(str(target))
    page.locator("#btn-import-corrections").click()
    info = page.locator("#corrections-info")
    expect(info).to_contain_text("12 images corrected from", timeout=60_000)
    expect(info).to_contain_text("12 images of this run have imported corrections")
    assert db("SELECT COUNT(DISTINCT image_id) FROM corrections WHERE run_id = 1")[0][0] == 12
    assert db("SELECT COUNT(*) FROM run_images WHERE run_id = 1 AND confirmed")[0][0] == 12
    status = page.locator("#refine-status-box")
    expect(status).to_contain_text("12 images with imported corrections show as predicted")
    expect(status).to_have_attribute("data-stale", "1")

    # Explore says which images carry corrections; forgetting one image's keeps it checked
    close_toasts(page)
    tab(page, "Explore")
    page.locator("#explore-gallery .thumbnail-item").nth(3).click()
    expect(field(page, "explore-image")).not_to_have_value("street_1.png")
    note = page.locator("#explore-corrections-text")
    expect(note).to_contain_text("Corrected in an annotation tool", timeout=30_000)
    expect(note).to_contain_text("not in the refined maps yet; refine with names")
    settle(page)
    shoot(page, shots / "explore_corrections.png")
    page.locator("#btn-forget-corrections").click()         # asked first; "Keep them" keeps them
    expect(page.locator("#forget-question")).to_contain_text("Forget this image's corrections")
    page.locator("#btn-forget-no").click()
    expect(page.locator("#forget-confirm")).to_be_hidden()
    expect(note).to_contain_text("Corrected in an annotation tool")
    assert db("SELECT COUNT(DISTINCT image_id) FROM corrections WHERE run_id = 1")[0][0] == 12
    page.locator("#btn-forget-corrections").click()
    page.locator("#btn-forget-yes").click()
    expect(page.locator(".toast-body").filter(has_text="Corrections forgotten (")).to_be_visible(
        timeout=30_000)
    expect(note).to_have_count(0)
    expect(page.locator("#btn-forget-corrections")).to_be_hidden()
    expect(page.locator("#forget-confirm")).to_be_hidden()
    assert db("SELECT COUNT(DISTINCT image_id) FROM corrections WHERE run_id = 1")[0][0] == 11
    assert db("SELECT COUNT(*) FROM run_images WHERE run_id = 1 AND confirmed")[0][0] == 12


def test_08_export_only_the_images_to_correct_next(page, db, app, tmp_path):
    # 11 of the 12 images carry imported corrections (test 07): the next batch is the one left
    close_toasts(page)
    tab(page, "Export")
    open_accordion(page, "export-more")
    page.locator("#export-to_correct input").fill("3")
    page.locator("#btn-export").click()
    summary = page.locator("#export-summary")
    expect(summary).to_contain_text("1 image to correct first, most useful first", timeout=120_000)
    expect(summary).to_contain_text("11 images whose corrections are already imported were left out")
    expect(summary).to_contain_text("Import corrected annotations")
    names = [i["file_name"] for i in download_coco(page, tmp_path / "to_correct.zip")["images"]]
    uncorrected = db("SELECT i.name FROM run_images r JOIN images i ON i.id = r.image_id WHERE r.run_id = 1 "
                     "AND r.image_id NOT IN (SELECT image_id FROM corrections WHERE run_id = 1)")
    assert names == [uncorrected[0][0]] and len(uncorrected) == 1
    # the same, in the same order, as the command line lists
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "label", "1", "to-correct", "-n", "3", "--json",
                           "--data-dir", str(app.data_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert names == [p["name"] for p in json.loads(proc.stdout)]
    for name in names:
        expect(summary).to_contain_text(name)
    options = json.loads(db("SELECT options FROM exports ORDER BY id DESC LIMIT 1")[0][0])
    assert options["to_correct"] == 3 and options["to_correct_images"] == names and options["to_correct_done"] == 11
    # a batch to correct is a one-off: the form shown again (here after a reload) exports every image
    page.reload()
    expect(field(page, "run-select")).to_have_value(re.compile(r"Run 1 · Finished"), timeout=30_000)
    tab(page, "Export")
    open_accordion(page, "export-more")
    expect(page.locator("#export-to_correct input")).to_have_value("0")
