"""The browser app: Gradio Blocks wired to the stego_app services.

Thin by design: every handler reads its inputs, calls one or two service functions
(projects, ingest, runs, labels, export) and formats the result with
stego_app.ui_helpers. What the page shows always comes from the database, so a
reload, a second tab or a restarted server shows the same projects, runs and names.

Errors a person can fix (UserError) become a toast with the service's message;
anything else is logged with its traceback on the server and shown as a short toast.
"""
from __future__ import annotations

import functools
import logging
import zipfile
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from stego_app import ui_helpers as H
from stego_app.errors import UserError

log = logging.getLogger(__name__)

GALLERY_PAGE = 100          # thumbnails per gallery page (the Explore dropdown lists every image)
THUMB_SIZE = 256            # long side of gallery thumbnails (cached files, stego_app.thumbnails)
DISPLAY_MAX_SIDE = 1024     # long side of the Explore original/overlay sent to the browser
N_EXAMPLES = 4              # example thumbnails per cluster card
EXAMPLE_SIZE = 160

CSS = """
.stego-status table.stego-stages { border-collapse: collapse; width: 100%; max-width: 760px; }
.stego-status table.stego-stages, .stego-status table.stego-stages tr,
.stego-status table.stego-stages td { border: none !important; background: transparent !important; }
.stego-status td { padding: 3px 8px; }
.stego-stage-name { white-space: nowrap; width: 14em; }
.stego-bar-cell { width: 55%; }
.stego-bar { background: var(--neutral-200); border-radius: 4px; height: 12px; overflow: hidden; }
.stego-bar-fill { background: var(--color-accent); height: 100%; transition: width .4s; }
.stego-stage-done .stego-bar-fill { background: #2ca02c; }
.stego-stage-stopped .stego-bar-fill { background: #d62728; }
.stego-stage-pending .stego-stage-name { opacity: .6; }
.stego-muted { opacity: .7; font-size: 90%; }
.stego-error { color: #d62728; font-weight: 600; }
.stego-state-done { color: #2ca02c; font-weight: 600; }
.stego-state-failed, .stego-state-interrupted, .stego-state-cancelled { color: #d62728; font-weight: 600; }
.stego-state-running, .stego-state-queued { color: var(--color-accent); font-weight: 600; }
.stego-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 10px; }
.stego-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px; }
.stego-card-ignored { opacity: .55; }
.stego-card-head { display: flex; align-items: center; gap: 6px; margin-bottom: 6px; }
.stego-card-label { font-weight: 600; flex: 1; }
.stego-card-share { font-variant-numeric: tabular-nums; }
.stego-card-examples { display: flex; gap: 4px; flex-wrap: wrap; }
.stego-card-examples img { height: 96px; max-width: 100%; object-fit: cover; border-radius: 4px; }
.stego-swatch { display: inline-block; border-radius: 3px; border: 1px solid rgba(0,0,0,.3);
                vertical-align: middle; margin-right: 4px; }
.stego-legend { display: flex; flex-wrap: wrap; gap: 4px 16px; padding: 4px 0; }
.stego-legend-item { white-space: nowrap; }
.stego-legend-ignored { opacity: .6; }
"""

# A tab whose server went away (restart, deploy) reloads itself once the server answers
# again: Gradio's own event stream does not recover when it breaks mid-event, and all
# state lives in the database anyway.
RECONNECT_JS = """
() => {
  let down = false;
  const ping = async () => {
    try {
      await fetch(window.location.pathname + "?stego_ping=" + Date.now(), {method: "HEAD", cache: "no-store"});
      if (down) { window.location.reload(); }
    } catch (e) {
      down = true;
    }
  };
  setInterval(ping, 2500);
}
"""

INTRO = """# STEGO class discovery
Find the kinds of regions in your images without labelling anything first, then name them.
**1 Project**: add images · **2 Discover**: run STEGO · **3 Clusters**: name, merge, ignore ·
**4 Explore**: check images · **5 Export**: download COCO."""


def _guard(fn: Callable) -> Callable:
    """Show UserError messages as an error toast; log anything else, show a short toast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as exc:
            log.info("UI action %s refused: %s", fn.__name__, exc)
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # a bug: the trace goes to the server log, not the page
            log.exception("UI action %s failed", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(exc).__name__}: {exc}). "
                           "The details are in the server log.", print_exception=False) from None

    return wrapper


def build_ui(ctx) -> gr.Blocks:
    """The whole app as a gr.Blocks bound to `ctx` (an AppContext)."""
    from stego_app import export as export_svc
    from stego_app import ingest, labels, projects, runs, thumbnails

    defaults = runs.RunParams()
    export_defaults = export_svc.ExportOptions()
    roots = [str(p) for p in ctx.config.allowed_roots]
    boot_projects = projects.list_projects(ctx)
    boot_runs = [r for p in boot_projects for r in runs.list_runs(ctx, p.id)]

    with gr.Blocks(title="STEGO class discovery", css=CSS, analytics_enabled=False,
                   theme=_theme(), js=RECONNECT_JS) as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            # Choices known at start-up are registered here, so a tab left open while the server
            # restarts still passes Gradio's choice check; each page load replaces them.
            project_dd = gr.Dropdown(label="Project", choices=H.project_choices(boot_projects), value=None,
                                     interactive=True,
                                     elem_id="project-select", scale=2)
            run_dd = gr.Dropdown(label="Discovery run", choices=H.run_choices(boot_runs), value=None,
                                 interactive=True,
                                 elem_id="run-select", scale=3,
                                 info="Runs of this project, newest first. Every tab works on this run.")
            refresh_btn = gr.Button("↻ Refresh", elem_id="btn-refresh", scale=0, min_width=110)

        sig_state = gr.State(None)           # last polled run state (skip redraws when unchanged)
        gallery_ids = gr.State([])           # image ids in the order the Explore gallery shows them

        with gr.Tabs(elem_id="tabs"):
            # ------------------------------------------------------------ Project
            with gr.Tab("1 · Project", id="project", elem_id="tab-project"):
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown("### New project")
                        new_name = gr.Textbox(label="Name", elem_id="new-project-name",
                                              placeholder="e.g. Street scenes, March")
                        new_desc = gr.Textbox(label="Description (optional)", elem_id="new-project-desc")
                        create_btn = gr.Button("Create project", elem_id="btn-create-project")
                        project_md = gr.Markdown(elem_id="project-info")
                    with gr.Column(scale=2):
                        gr.Markdown("### Add images to the selected project")
                        upload = gr.File(label="Images or .zip archives (drop files here)",
                                         file_count="multiple", type="filepath", elem_id="upload-files",
                                         height=150)
                        upload_btn = gr.Button("Add uploaded files", variant="primary",
                                               elem_id="btn-ingest-upload")
                        with gr.Row(equal_height=True):
                            folder = gr.Textbox(
                                label="…or a folder on the server", elem_id="server-folder", scale=3,
                                placeholder=roots[0] if roots else "no folders allowed on this server",
                                info=("Allowed: " + ", ".join(roots)) if roots else
                                "The administrator can allow folders with --allowed-root.")
                            folder_btn = gr.Button("Add folder", elem_id="btn-ingest-folder", scale=1)
                ingest_md = gr.Markdown(elem_id="ingest-summary")
                problems_df = gr.Dataframe(headers=["File", "Problem", "Reason"], value=[],
                                           label="Files that were not added", interactive=False,
                                           elem_id="ingest-problems", wrap=True)
                project_gallery = gr.Gallery(label="Images in this project", columns=10, height=260,
                                             allow_preview=True, elem_id="project-images",
                                             object_fit="cover", show_download_button=False)
                project_page = gr.Slider(label="Page", minimum=1, maximum=1, step=1, value=1,
                                         visible=False, elem_id="project-page")

            # ------------------------------------------------------------ Discover
            with gr.Tab("2 · Discover", id="discover", elem_id="tab-discover") as discover_tab:
                with gr.Row():
                    backbone_dd = gr.Dropdown(label="Backbone", choices=runs.backbone_choices(ctx), value="",
                                              elem_id="backbone", info="Frozen DINO / DINOv2 features")
                    resolution = gr.Number(label="Resolution (short side, px)", value=defaults.resolution,
                                           precision=0, minimum=28, maximum=2048, elem_id="resolution")
                    n_clusters = gr.Slider(label="Number of clusters", minimum=2, maximum=64, step=1,
                                           value=defaults.n_clusters, elem_id="n-clusters")
                    crf = gr.Checkbox(label="Refine edges with a CRF", value=defaults.crf, elem_id="crf")
                with gr.Accordion("Advanced: STEGO hyper-parameters", open=False, elem_id="advanced"):
                    with gr.Row():
                        steps = gr.Number(label="Training steps", value=defaults.steps, precision=0,
                                          minimum=0, elem_id="steps")
                        batch_size = gr.Number(label="Batch size", value=defaults.batch_size, precision=0,
                                               minimum=1, elem_id="batch-size")
                        code_dim = gr.Number(label="Code dimension", value=defaults.code_dim, precision=0,
                                             minimum=2, elem_id="code-dim")
                        lr = gr.Number(label="Learning rate", value=defaults.lr, elem_id="lr")
                    with gr.Row():
                        crop_mode = gr.Radio(label="Crops", choices=[("whole image", "none"),
                                                                     ("five crops", "five")],
                                             value=defaults.crop_mode, elem_id="crop-mode")
                        flip = gr.Checkbox(label="Average with the flipped image", value=defaults.flip,
                                           elem_id="flip")
                        seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="seed")
                        crf_res = gr.Textbox(label="CRF resolution (short side, px)", value="",
                                             placeholder="same as resolution; 0 = full size",
                                             elem_id="crf-resolution")
                    gr.Markdown("Loss shifts: leave empty to choose them automatically from feature statistics.")
                    with gr.Row():
                        shift_self = gr.Textbox(label="Shift (self)", value="", placeholder="auto",
                                                elem_id="shift-self")
                        shift_knn = gr.Textbox(label="Shift (KNN)", value="", placeholder="auto",
                                                elem_id="shift-knn")
                        shift_neg = gr.Textbox(label="Shift (negative)", value="", placeholder="auto",
                                                elem_id="shift-neg")
                    with gr.Row():
                        weight_self = gr.Number(label="Weight (self)", value=defaults.weight_self,
                                                elem_id="weight-self")
                        weight_knn = gr.Number(label="Weight (KNN)", value=defaults.weight_knn,
                                               elem_id="weight-knn")
                        weight_neg = gr.Number(label="Weight (negative)", value=defaults.weight_neg,
                                               elem_id="weight-neg")
                with gr.Row():
                    start_btn = gr.Button("Start discovery", variant="primary", elem_id="btn-start")
                    cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="btn-cancel")
                    resume_btn = gr.Button("Resume run", elem_id="btn-resume")
                status_html = gr.HTML(H.run_status_html(None), elem_id="run-status")
                loss_plot = gr.LinePlot(value=None, visible=False, x="step", y="value", color="term",
                                        title="Training loss", x_title="step", y_title="loss",
                                        height=260, elem_id="loss-plot")

            # ------------------------------------------------------------ Clusters
            with gr.Tab("3 · Clusters", id="clusters", elem_id="tab-clusters"):
                gr.Markdown("Each card is a discovered cluster: its colour, its share of all pixels and the "
                            "images where it is most confident (the cluster tinted). Select clusters below, "
                            "then name them (one), merge them under one name (several), undo a merge or "
                            "ignore them.")
                cards_html = gr.HTML(H.cluster_cards_html([], lambda c, i: None), elem_id="clusters-html")
                cluster_sel = gr.CheckboxGroup(label="Selected clusters", choices=[], elem_id="cluster-select")
                with gr.Row(equal_height=True):
                    label_name = gr.Textbox(label="Label name", elem_id="label-name", scale=2,
                                            placeholder="e.g. sky; an existing name merges into it")
                    name_btn = gr.Button("Name / merge selected", variant="primary", elem_id="btn-name")
                    unmerge_btn = gr.Button("Undo merge / unname", elem_id="btn-unmerge")
                    ignore_btn = gr.Button("Ignore", elem_id="btn-ignore")
                    unignore_btn = gr.Button("Stop ignoring", elem_id="btn-unignore")
                with gr.Row(equal_height=True):
                    colour_label = gr.Dropdown(label="Label to recolour", choices=[], allow_custom_value=True,
                                               elem_id="colour-label")
                    colour_pick = gr.ColorPicker(label="Colour", value="#1f77b4", elem_id="colour-picker")
                    colour_btn = gr.Button("Set colour", elem_id="btn-colour")
                legend_html = gr.HTML(H.legend_html([], "clusters-legend-inner"), elem_id="clusters-legend")

            # ------------------------------------------------------------ Explore
            with gr.Tab("4 · Explore", id="explore", elem_id="tab-explore"):
                explore_gallery = gr.Gallery(label="Click an image", columns=10, height=200,
                                             allow_preview=False, elem_id="explore-gallery",
                                             object_fit="cover", show_download_button=False)
                explore_page = gr.Slider(label="Page", minimum=1, maximum=1, step=1, value=1,
                                         visible=False, elem_id="explore-page")
                with gr.Row(equal_height=True):
                    image_dd = gr.Dropdown(label="Image", choices=[], allow_custom_value=True,
                                           elem_id="explore-image", scale=2)
                    opacity = gr.Slider(label="Overlay opacity", minimum=0, maximum=1, step=0.05,
                                        value=0.5, elem_id="opacity", scale=2)
                    explore_crf = gr.Checkbox(label="CRF-refined", value=True, elem_id="explore-crf", scale=1)
                    confirm_cb = gr.Checkbox(label="Checked: use as seed annotation", value=False,
                                             elem_id="explore-confirm", scale=1)
                shown = gr.CheckboxGroup(label="Show clusters", choices=[], elem_id="explore-visible")
                with gr.Row():
                    original_img = gr.Image(label="Original", interactive=False, elem_id="explore-original",
                                            show_download_button=False, height=420)
                    overlay_img = gr.Image(label="Segmentation", interactive=False, elem_id="explore-overlay",
                                           show_download_button=False, height=420)
                explore_legend = gr.HTML(H.legend_html([], "explore-legend-inner"), elem_id="explore-legend")

            # ------------------------------------------------------------ Export
            with gr.Tab("5 · Export", id="export", elem_id="tab-export"):
                gr.Markdown("COCO export of the named clusters of the selected run (unnamed and ignored "
                            "clusters are left out unless you include them).")
                with gr.Row():
                    exp_style = gr.Radio(label="Annotation style",
                                         choices=[("stuff: one mask per image and label", "stuff"),
                                                  ("instance: one polygon set per connected region",
                                                   "instance")],
                                         value=export_defaults.style, elem_id="export-style")
                    exp_min_area = gr.Number(label="Smallest region kept (px, instance style)",
                                             value=export_defaults.min_area, precision=0, minimum=0,
                                             elem_id="export-min-area")
                with gr.Row():
                    exp_crf = gr.Checkbox(label="Use CRF-refined segments", value=export_defaults.crf,
                                          elem_id="export-crf")
                    exp_confirmed = gr.Checkbox(label="Only images checked in Explore",
                                                value=export_defaults.confirmed_only,
                                                elem_id="export-confirmed")
                    exp_unnamed = gr.Checkbox(label="Include unnamed clusters",
                                              value=getattr(export_defaults, "include_unnamed", False),
                                              elem_id="export-unnamed")
                    exp_panoptic = gr.Checkbox(label="Also COCO panoptic", value=export_defaults.panoptic,
                                               elem_id="export-panoptic")
                    exp_pngs = gr.Checkbox(label="Also label PNGs", value=export_defaults.label_pngs,
                                           elem_id="export-pngs")
                export_btn = gr.Button("Export COCO", variant="primary", elem_id="btn-export")
                export_md = gr.Markdown(elem_id="export-summary")
                download_btn = gr.DownloadButton("Download export (.zip)", visible=False,
                                                 elem_id="btn-download")

        timer = gr.Timer(1.0)

        run_outputs = [run_dd, status_html, loss_plot, sig_state, cards_html, cluster_sel, colour_label,
                       legend_html, image_dd, explore_gallery, gallery_ids, explore_page, shown, original_img,
                       overlay_img, explore_legend, confirm_cb, explore_crf, opacity, export_md, download_btn]
        label_outputs = [cards_html, cluster_sel, colour_label, legend_html, shown, original_img,
                         overlay_img, explore_legend, confirm_cb]

        # ---------------------------------------------------------------- view builders
        def project_choices_update(value):
            return gr.update(choices=H.project_choices(projects.list_projects(ctx)), value=value)

        def page_views(gallery, slider, page) -> dict:
            """A thumbnail gallery and its page slider (hidden while everything fits on one page)."""
            return {gallery: [(str(path), info.name) for info, path in page.items],
                    slider: gr.update(maximum=page.n_pages, value=page.page, visible=page.n_pages > 1,
                                      info=H.page_caption(page.start, page.stop, page.total))}

        def project_gallery_views(pid, page) -> dict:
            return page_views(project_gallery, project_page,
                              thumbnails.project_gallery(ctx, pid, page, GALLERY_PAGE, THUMB_SIZE))

        def explore_gallery_views(run_id, page) -> dict:
            shown_page = thumbnails.run_gallery(ctx, run_id, page, GALLERY_PAGE, THUMB_SIZE)
            out = page_views(explore_gallery, explore_page, shown_page)
            out[gallery_ids] = [info.id for info, _ in shown_page.items]
            return out

        def project_views(pid, page=1) -> dict:
            if pid is None:
                return {run_dd: gr.update(choices=[], value=None),
                        project_md: "No project yet: create one on the left.",
                        project_gallery: [], project_page: gr.update(value=1, maximum=1, visible=False)}
            p = projects.get_project(ctx, pid)
            images = ingest.list_images(ctx, pid)
            run_list = runs.list_runs(ctx, pid)
            md = f"**{H.esc(p.name)}**" + (f": {H.esc(p.description)}" if p.description else "")
            md += "\n\n" + H.images_summary(images)
            out = {run_dd: gr.update(choices=H.run_choices(run_list),
                                     value=run_list[0].id if run_list else None),
                   project_md: md}
            out.update(project_gallery_views(pid, page))
            return out

        def example_urls(run_id: int, clusters) -> dict[tuple[int, int], str]:
            urls: dict[tuple[int, int], str] = {}
            for c in clusters:
                try:
                    thumbs = labels.cluster_examples(ctx, run_id, c.index, n=N_EXAMPLES, size=EXAMPLE_SIZE)
                except UserError as exc:
                    log.warning("no examples for cluster %s of run %s: %s", c.index, run_id, exc)
                    continue
                for image_id, arr in thumbs:
                    urls[(c.index, image_id)] = H.image_data_uri(arr)
            return urls

        def render(run_id, image_id, op, use_crf, visible, all_indices) -> dict:
            if run_id is None or image_id is None:
                return {original_img: None, overlay_img: None,
                        explore_legend: H.legend_html([], "explore-legend-inner"),
                        confirm_cb: gr.update(value=False, interactive=False)}
            hidden = H.hidden_clusters(all_indices, visible)
            view = labels.render_segmentation(ctx, run_id, int(image_id), crf=bool(use_crf),
                                              opacity=float(op if op is not None else 0.5), hidden=hidden,
                                              max_side=DISPLAY_MAX_SIDE)
            return {original_img: view.original, overlay_img: view.overlay,
                    explore_legend: H.legend_html(view.legend, "explore-legend-inner"),
                    confirm_cb: gr.update(value=bool(view.confirmed), interactive=True)}

        def label_views(run_id, image_id, op, use_crf, visible, reset_visible: bool = False) -> dict:
            """Everything that shows the cluster -> label mapping of a finished run."""
            clusters = labels.list_clusters(ctx, run_id)
            urls = example_urls(run_id, clusters)
            indices = [c.index for c in clusters]
            if reset_visible or visible is None:
                visible = indices
            else:
                previous = set(visible)
                visible = [i for i in indices if i in previous]
            out = {cards_html: H.cluster_cards_html(clusters, lambda c, i: urls.get((c.index, i)),
                                                    N_EXAMPLES),
                   cluster_sel: gr.update(choices=H.cluster_choices(clusters), value=[]),
                   colour_label: gr.update(choices=H.label_names(clusters), value=None),
                   legend_html: H.legend_html(labels.legend(ctx, run_id), "clusters-legend-inner"),
                   shown: gr.update(choices=H.visible_cluster_choices(clusters), value=visible)}
            out.update(render(run_id, image_id, op, use_crf, visible, indices))
            return out

        def empty_label_views(message: str) -> dict:
            return {cards_html: f'<div class="stego-cards" id="cluster-cards"><p>{H.esc(message)}</p></div>',
                    cluster_sel: gr.update(choices=[], value=[]),
                    colour_label: gr.update(choices=[], value=None),
                    legend_html: H.legend_html([], "clusters-legend-inner"),
                    shown: gr.update(choices=[], value=[]),
                    original_img: None, overlay_img: None,
                    explore_legend: H.legend_html([], "explore-legend-inner"),
                    confirm_cb: gr.update(value=False, interactive=False)}

        def status_views(info) -> dict:
            frame = _loss_frame(info.history if info is not None else [])
            return {status_html: H.run_status_html(info),
                    loss_plot: gr.update(value=frame, visible=frame is not None),
                    sig_state: H.status_signature(info)}

        def run_views(run_id) -> dict:
            if run_id is None:
                out = status_views(None)
                out.update(empty_label_views("No run selected: start one in the Discover tab."))
                out.update({image_dd: gr.update(choices=[], value=None), explore_gallery: [],
                            gallery_ids: [], explore_page: gr.update(value=1, maximum=1, visible=False),
                            export_md: "", download_btn: gr.update(visible=False)})
                return out
            info = runs.get_run(ctx, run_id)
            out = status_views(info)
            out[run_dd] = gr.update(choices=H.run_choices(runs.list_runs(ctx, info.project_id)), value=run_id)
            if info.status != "done":
                word = H.STATUS_WORDS.get(info.status, info.status).lower()
                out.update(empty_label_views(f"Run {info.id} is {word}: its clusters appear here "
                                             "when it has finished."))
                out.update({image_dd: gr.update(choices=[], value=None), explore_gallery: [],
                            gallery_ids: [], explore_page: gr.update(value=1, maximum=1, visible=False),
                            export_md: "", download_btn: gr.update(visible=False)})
                return out
            items = runs.run_images(ctx, run_id)
            first = items[0].image_id if items else None
            out.update({image_dd: gr.update(choices=[(it.name, it.image_id) for it in items], value=first),
                        opacity: 0.5,
                        explore_crf: gr.update(value=bool(info.params.crf), interactive=bool(info.params.crf))})
            out.update(explore_gallery_views(run_id, 1))
            out.update(label_views(run_id, first, 0.5, info.params.crf, None, reset_visible=True))
            out.update(export_views(run_id))
            return out

        def export_views(run_id) -> dict:
            done = [e for e in export_svc.list_exports(ctx, run_id)
                    if e.status == "done" and e.zip_path and Path(e.zip_path).is_file()]
            if not done:
                return {export_md: "No export of this run yet.", download_btn: gr.update(visible=False)}
            latest = done[0]
            return {export_md: H.export_summary(latest),
                    download_btn: gr.update(value=str(latest.zip_path), visible=True,
                                            label=f"Download {Path(latest.zip_path).name}")}

        # ---------------------------------------------------------------- handlers
        @_guard
        def on_load():
            plist = projects.list_projects(ctx)
            pid = plist[-1].id if plist else None
            out = {project_dd: gr.update(choices=H.project_choices(plist), value=pid)}
            out.update(project_views(pid))
            return out

        @_guard
        def on_project(pid):
            pid = H.as_id(pid, "project")
            return project_views(pid)

        @_guard
        def on_refresh(pid, run_id):
            pid = H.as_id(pid, "project")
            run_id = H.as_id(run_id, "run")
            out = {project_dd: project_choices_update(pid)}
            if pid is not None:
                run_list = runs.list_runs(ctx, pid)
                ids = [r.id for r in run_list]
                keep = run_id if run_id in ids else (ids[0] if ids else None)
                out[run_dd] = gr.update(choices=H.run_choices(run_list), value=keep)
                if keep == run_id:
                    out.update(run_views(run_id))
            return out

        @_guard
        def on_create(name, desc):
            p = projects.create_project(ctx, name, desc or "")
            gr.Info(f"Project '{p.name}' created. Now add images.")
            out = {project_dd: project_choices_update(p.id), new_name: "", new_desc: ""}
            return out

        @_guard
        def on_ingest_upload(pid, files, progress=gr.Progress()):
            pid = H.as_id(pid, "project")
            if pid is None:
                raise UserError("create or choose a project first")
            if not files:
                raise UserError("drop some image files or .zip archives into the upload box first")
            reports = []
            archives = [Path(f) for f in files if zipfile.is_zipfile(f)]
            plain = [Path(f) for f in files if Path(f) not in archives]
            cb = _progress_cb(progress, "Checking images")
            if plain:
                reports.append(ingest.ingest_files(ctx, pid, plain, [p.name for p in plain], progress=cb))
            for z in archives:
                try:
                    reports.append(ingest.ingest_zip(ctx, pid, z, progress=cb))
                except UserError as exc:   # one bad archive does not hide the other files' reports
                    reports.append(_problem_report(z.name, str(exc)))
            return ingest_result(pid, reports, {upload: None})

        @_guard
        def on_ingest_folder(pid, path, progress=gr.Progress()):
            pid = H.as_id(pid, "project")
            if pid is None:
                raise UserError("create or choose a project first")
            if not (path or "").strip():
                raise UserError("type the path of a folder on the server")
            report = ingest.ingest_folder(ctx, pid, path.strip(), progress=_progress_cb(progress, "Checking images"))
            return ingest_result(pid, [report], {})

        def ingest_result(pid, reports, extra) -> dict:
            merged = H.merge_reports(reports)
            n = len(merged["added"])
            if n:
                gr.Info(f"{n} image{'s' if n != 1 else ''} added.")
            elif merged["rejected"] or merged["duplicates"]:
                gr.Warning("No image was added; see the list of problems.")
            out = {project_dd: project_choices_update(pid), ingest_md: H.ingest_summary(merged),
                   problems_df: H.ingest_problem_rows(merged), **extra}
            views = project_views(pid)
            views.pop(run_dd)     # keep the selected run
            out.update(views)
            return out

        @_guard
        def on_start(pid, bb, res, k, use_crf, n_steps, bs, cdim, rate, crops, use_flip, sd, s_self, s_knn,
                     s_neg, w_self, w_knn, w_neg, crf_side):
            pid = H.as_id(pid, "project")
            if pid is None:
                raise UserError("create or choose a project with images first")
            params = H.params_from_form(runs.RunParams, dict(
                backbone=bb or None, resolution=res, n_clusters=k, crf=use_crf, steps=n_steps,
                batch_size=bs, code_dim=cdim, lr=rate, crop_mode=crops, flip=use_flip, seed=sd, shift_self=s_self,
                shift_knn=s_knn, shift_neg=s_neg, weight_self=w_self, weight_knn=w_knn, weight_neg=w_neg,
                crf_resolution=crf_side))
            info = runs.start_run(ctx, pid, params)
            gr.Info(f"Run {info.id} started on {info.n_images} images.")
            return {run_dd: gr.update(choices=H.run_choices(runs.list_runs(ctx, pid)), value=info.id)}

        @_guard
        def on_cancel(pid, run_id):
            pid = H.as_id(pid, "project")
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                raise UserError("no run selected")
            info = runs.cancel_run(ctx, run_id)
            gr.Info(f"Run {info.id}: cancelling." if info.status == "running" else f"Run {info.id} cancelled.")
            out = status_views(info)
            out[run_dd] = gr.update(choices=H.run_choices(runs.list_runs(ctx, pid)), value=run_id)
            return out

        @_guard
        def on_resume(pid, run_id):
            pid = H.as_id(pid, "project")
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                raise UserError("no run selected")
            info = runs.resume_run(ctx, run_id)
            gr.Info(f"Run {info.id} resumed; finished stages are reused.")
            out = status_views(info)
            out[run_dd] = gr.update(choices=H.run_choices(runs.list_runs(ctx, pid)), value=run_id)
            return out

        def on_tick(pid, run_id, sig):
            """Poll the selected run; redraw only what changed. Never raises (it runs every second)."""
            try:
                run_id = H.as_id(run_id, "run")
                if run_id is None:
                    return {sig_state: gr.skip()}
                info = runs.get_run(ctx, run_id)
                new_sig = H.status_signature(info)
                if sig is not None and new_sig == tuple(sig):
                    return {sig_state: gr.skip()}
                out = status_views(info)
                same_run = sig is not None and len(sig) > 1 and sig[0] == info.id
                if same_run and sig[1] != info.status:
                    out[run_dd] = gr.update(choices=H.run_choices(runs.list_runs(ctx, info.project_id)),
                                            value=run_id)
                    if info.status == "done":
                        out.update(run_views(run_id))
                        gr.Info(f"Run {info.id} finished: {info.params.n_clusters} clusters to name.")
                    elif info.status == "failed":
                        gr.Warning(f"Run {info.id} failed: {info.error}")
                return out
            except Exception as exc:  # noqa: BLE001 - shown in the status box, logged once per change
                err_sig = ("error", run_id, str(exc))
                if sig is not None and tuple(sig) == err_sig:
                    return {sig_state: gr.skip()}
                if isinstance(exc, UserError):
                    log.info("polling run %s: %s", run_id, exc)
                else:
                    log.exception("polling run %s failed", run_id)
                return {status_html: f'<p class="stego-error">Could not read run {run_id}: {H.esc(exc)}</p>',
                        sig_state: err_sig}

        @_guard
        def on_status(run_id):
            run_id = H.as_id(run_id, "run")
            return status_views(runs.get_run(ctx, run_id) if run_id is not None else None)

        @_guard
        def on_run(run_id):
            run_id = H.as_id(run_id, "run")
            return run_views(run_id)

        def _need_selection(run_id, selected):
            if run_id is None:
                raise UserError("no run selected")
            if not selected:
                raise UserError("select one or more clusters first (tick them under the cards)")
            return [int(i) for i in selected]

        @_guard
        def on_name(run_id, selected, name, image_id, op, use_crf, visible):
            run_id = H.as_id(run_id, "run")
            image_id = H.as_id(image_id, "image")
            idx = _need_selection(run_id, selected)
            if len(idx) == 1:
                labels.name_cluster(ctx, run_id, idx[0], name)
                gr.Info(f"Cluster {idx[0]} is now '{' '.join((name or '').split())}'.")
            else:
                labels.merge_clusters(ctx, run_id, idx, name)
                gr.Info(f"Clusters {', '.join(map(str, idx))} merged into '{' '.join((name or '').split())}'.")
            out = label_views(run_id, image_id, op, use_crf, visible)
            out[label_name] = ""
            return out

        @_guard
        def on_unmerge(run_id, selected, image_id, op, use_crf, visible):
            run_id = H.as_id(run_id, "run")
            image_id = H.as_id(image_id, "image")
            for i in _need_selection(run_id, selected):
                labels.unmerge_cluster(ctx, run_id, i)
            return label_views(run_id, image_id, op, use_crf, visible)

        def on_ignore_factory(flag: bool):
            @_guard
            def on_ignore(run_id, selected, image_id, op, use_crf, visible):
                run_id = H.as_id(run_id, "run")
                image_id = H.as_id(image_id, "image")
                for i in _need_selection(run_id, selected):
                    labels.ignore_cluster(ctx, run_id, i, flag)
                return label_views(run_id, image_id, op, use_crf, visible)
            return on_ignore

        @_guard
        def on_colour(run_id, label, colour, image_id, op, use_crf, visible):
            run_id = H.as_id(run_id, "run")
            image_id = H.as_id(image_id, "image")
            if run_id is None:
                raise UserError("no run selected")
            if not label:
                raise UserError("choose the label to recolour (name a cluster first)")
            labels.set_label_colour(ctx, run_id, label, _colour_hex(colour))
            return label_views(run_id, image_id, op, use_crf, visible)

        @_guard
        def on_render(run_id, image_id, op, use_crf, visible):
            run_id = H.as_id(run_id, "run")
            image_id = H.as_id(image_id, "image")
            if run_id is None or image_id is None:
                return render(None, None, op, use_crf, visible, [])
            info = runs.get_run(ctx, run_id)
            if info.status != "done":
                return render(None, None, op, use_crf, visible, [])
            indices = [c.index for c in labels.list_clusters(ctx, run_id)]
            return render(run_id, image_id, op, use_crf, visible, indices)

        @_guard
        def on_project_page(pid, page):
            pid = H.as_id(pid, "project")
            if pid is None:
                return gr.skip()
            return project_gallery_views(pid, page)

        @_guard
        def on_explore_page(run_id, page):
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                return gr.skip()
            return explore_gallery_views(run_id, page)

        @_guard
        def on_gallery_select(ids, evt: gr.SelectData):
            if evt is None or evt.index is None or not ids:
                return gr.skip()
            i = evt.index if isinstance(evt.index, int) else evt.index[0]
            if not 0 <= i < len(ids):
                return gr.skip()
            return gr.update(value=ids[i])

        @_guard
        def on_confirm(run_id, image_id, checked):
            run_id = H.as_id(run_id, "run")
            image_id = H.as_id(image_id, "image")
            if run_id is None or image_id is None:
                raise UserError("choose an image first")
            labels.confirm_image(ctx, run_id, int(image_id), bool(checked))
            n = labels.confirmed_count(ctx, run_id)
            gr.Info(f"{'Checked' if checked else 'Unchecked'}; {n} image{'s' if n != 1 else ''} checked in this run.")

        @_guard
        def on_export(run_id, style, min_area, use_crf, confirmed_only, unnamed, panoptic, pngs,
                      progress=gr.Progress()):
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                raise UserError("no run selected")
            wanted = dict(style=style, crf=bool(use_crf), confirmed_only=bool(confirmed_only),
                          min_area=int(min_area if min_area is not None else export_defaults.min_area),
                          panoptic=bool(panoptic), label_pngs=bool(pngs), include_unnamed=bool(unnamed))
            options = _dataclass_from(export_svc.ExportOptions, wanted)
            info = export_svc.export_run(ctx, run_id, options, progress=_progress_cb(progress, "Exporting"))
            if info.status != "done" or not info.zip_path:
                raise UserError(f"the export failed: {info.error or 'no zip was written'}")
            gr.Info(f"Export {info.id} ready: {info.n_annotations} annotations.")
            return {export_md: H.export_summary(info),
                    download_btn: gr.update(value=str(info.zip_path), visible=True,
                                            label=f"Download {Path(info.zip_path).name}")}

        # ---------------------------------------------------------------- wiring
        explore_inputs = [image_dd, opacity, explore_crf, shown]
        project_outputs = [run_dd, project_md, project_gallery, project_page]
        demo.load(on_load, outputs=[project_dd] + project_outputs)
        project_dd.change(on_project, project_dd, project_outputs)
        project_page.input(on_project_page, [project_dd, project_page], [project_gallery, project_page],
                           trigger_mode="always_last")
        explore_page.input(on_explore_page, [run_dd, explore_page], [explore_gallery, gallery_ids, explore_page],
                           trigger_mode="always_last")
        run_dd.change(on_run, run_dd, run_outputs)
        discover_tab.select(on_status, run_dd, [status_html, loss_plot, sig_state], show_progress="hidden")
        refresh_btn.click(on_refresh, [project_dd, run_dd], [project_dd] + run_outputs)
        create_btn.click(on_create, [new_name, new_desc], [project_dd, new_name, new_desc])
        ingest_outputs = [project_dd, ingest_md, problems_df, project_md, project_gallery, project_page, upload]
        upload_btn.click(on_ingest_upload, [project_dd, upload], ingest_outputs)
        folder_btn.click(on_ingest_folder, [project_dd, folder], ingest_outputs)
        start_btn.click(on_start, [project_dd, backbone_dd, resolution, n_clusters, crf, steps, batch_size,
                                   code_dim, lr, crop_mode, flip, seed, shift_self, shift_knn, shift_neg,
                                   weight_self, weight_knn, weight_neg, crf_res], [run_dd])
        cancel_btn.click(on_cancel, [project_dd, run_dd], [status_html, loss_plot, sig_state, run_dd])
        resume_btn.click(on_resume, [project_dd, run_dd], [status_html, loss_plot, sig_state, run_dd])
        timer.tick(on_tick, [project_dd, run_dd, sig_state], run_outputs, show_progress="hidden")
        edit_inputs = [run_dd, cluster_sel]
        name_btn.click(on_name, edit_inputs + [label_name] + explore_inputs, label_outputs + [label_name])
        unmerge_btn.click(on_unmerge, edit_inputs + explore_inputs, label_outputs)
        ignore_btn.click(on_ignore_factory(True), edit_inputs + explore_inputs, label_outputs)
        unignore_btn.click(on_ignore_factory(False), edit_inputs + explore_inputs, label_outputs)
        colour_btn.click(on_colour, [run_dd, colour_label, colour_pick] + explore_inputs, label_outputs)
        render_outputs = [original_img, overlay_img, explore_legend, confirm_cb]
        image_dd.change(on_render, [run_dd] + explore_inputs, render_outputs)
        for control in (opacity, explore_crf, shown):    # while dragging, only the last value renders
            control.input(on_render, [run_dd] + explore_inputs, render_outputs, trigger_mode="always_last",
                          show_progress="hidden")
        explore_gallery.select(on_gallery_select, [gallery_ids], [image_dd])
        confirm_cb.input(on_confirm, [run_dd, image_dd, confirm_cb], None)
        export_btn.click(on_export, [run_dd, exp_style, exp_min_area, exp_crf, exp_confirmed, exp_unnamed,
                                     exp_panoptic, exp_pngs], [export_md, download_btn])
    return demo


def _theme() -> gr.themes.Base:
    """The Soft theme with system fonts: no font download, so it works on offline servers."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def _loss_frame(history) -> pd.DataFrame | None:
    """Long-format loss history, or None when there is none yet.

    (An empty DataFrame would leave Gradio 5.50's LinePlot blank even after later updates.)
    """
    rows = H.loss_rows(history)
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "value", "term"])
    return frame.astype({"step": "int64", "value": "float64", "term": "str"})


def _progress_cb(progress, desc: str):
    def cb(done: int, total: int) -> None:
        try:
            progress((done, total) if total else 0.0, desc=desc)
        except Exception:  # noqa: BLE001 - progress display is best effort
            pass
    return cb


def _problem_report(name: str, reason: str):
    from stego_app.ingest import FileProblem, IngestReport

    return IngestReport(added=[], duplicates=[], rejected=[FileProblem(name=name, reason=reason)])


def _dataclass_from(cls, values: dict[str, Any]):
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _colour_hex(value: str | None) -> str:
    """gr.ColorPicker gives '#rrggbb' or sometimes 'rgba(r, g, b, a)'."""
    v = (value or "").strip()
    if v.startswith("rgb"):
        nums = [float(x) for x in v[v.index("(") + 1: v.index(")")].split(",")[:3]]
        return "#" + "".join(f"{int(round(n)):02x}" for n in nums)
    return v


def allowed_paths(ctx) -> list[str]:
    """Folders the browser may fetch files from: gallery thumbnails and exports.

    (Original images never leave the server as files: galleries show cached thumbnails
    and the Explore tab sends downscaled arrays.)
    """
    cfg = ctx.config
    return [str(Path(p)) for p in (cfg.thumbs_dir, cfg.exports_dir)]


def blocked_paths(ctx) -> list[str]:
    cfg = ctx.config
    out = [str(cfg.data_dir / "stego.db"), str(cfg.cache_dir or cfg.data_dir / "cache")]
    return out


def launch(ctx, host: str | None = None, port: int | None = None,
           auth: tuple[str, str] | None = None, **kwargs) -> None:
    """Serve the app (blocking) on host:port, by default the AppConfig's (127.0.0.1:7860).

    `auth` ("user", "password"), by default AppConfig.auth, asks for a login first.
    """
    cfg = ctx.config
    host = host or cfg.host
    port = port or cfg.port
    auth = auth if auth is not None else cfg.auth
    demo = build_ui(ctx)
    demo.queue(default_concurrency_limit=4)
    log.info("serving the app on http://%s:%s%s", host, port, " (login required)" if auth else "")
    demo.launch(server_name=host, server_port=port, auth=auth, show_error=True, show_api=False,
                allowed_paths=allowed_paths(ctx), blocked_paths=blocked_paths(ctx),
                max_file_size=cfg.max_upload_bytes, ssr_mode=False, inbrowser=False,
                auth_message="STEGO class discovery: please log in." if auth else None, **kwargs)
