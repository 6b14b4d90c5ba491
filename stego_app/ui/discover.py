"""Tab 2 · Discover: the run settings form, start / cancel / resume, live progress and loss."""
from __future__ import annotations

import logging

import gradio as gr
import pandas as pd

from stego_app import eta, removal, runs
from stego_app.errors import UserError
from stego_app.models import RunStatus
from stego_app.runs import RunParams
from stego_app.ui import formatting as H
from stego_app.ui.common import guard

log = logging.getLogger(__name__)

# The form's fields in the order on_start receives them (after the project).
FORM_FIELDS = ("backbone", "resolution", "n_clusters", "crf", "steps", "batch_size", "code_dim", "lr",
               "crop_mode", "flip", "seed", "shift_self", "shift_knn", "shift_neg", "weight_self",
               "weight_knn", "weight_neg", "crf_resolution")


def loss_frame(history) -> pd.DataFrame | None:
    """Long-format loss history, or None when there is none yet.

    (An empty DataFrame would leave Gradio 5.50's LinePlot blank even after later updates.)
    """
    rows = H.loss_rows(history)
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "value", "term"])
    return frame.astype({"step": "int64", "value": "float64", "term": "str"})


class DiscoverTab:
    """The Discover tab's components (built in the current gr.Tab) and handlers."""

    def __init__(self, app, tab):
        self.app, self.ctx, self.tab = app, app.ctx, tab
        defaults = RunParams()
        f: dict[str, gr.components.Component] = {}
        with gr.Row():
            f["backbone"] = gr.Dropdown(label="Backbone", choices=runs.backbone_choices(self.ctx), value="",
                                        elem_id="backbone", info="Frozen DINO / DINOv2 features")
            f["resolution"] = gr.Number(label="Resolution (short side, px)", value=defaults.resolution,
                                        precision=0, minimum=28, maximum=2048, elem_id="resolution")
            f["n_clusters"] = gr.Number(label="Number of clusters", value=defaults.n_clusters, precision=0,
                                        elem_id="n-clusters", info="2 to 128; checked when the run starts")
            f["crf"] = gr.Checkbox(label="Refine edges with a CRF", value=defaults.crf, elem_id="crf")
        with gr.Accordion("Advanced: STEGO hyper-parameters", open=False, elem_id="advanced"):
            with gr.Row():
                f["steps"] = gr.Number(label="Training steps", value=defaults.steps, precision=0,
                                       minimum=0, elem_id="steps", info=runs.AUTO_STEPS_HELP)
                f["batch_size"] = gr.Number(label="Batch size", value=defaults.batch_size, precision=0,
                                            minimum=1, elem_id="batch-size")
                f["code_dim"] = gr.Number(label="Code dimension", value=defaults.code_dim, precision=0,
                                          minimum=2, elem_id="code-dim")
                f["lr"] = gr.Number(label="Learning rate", value=defaults.lr, elem_id="lr")
            with gr.Row():
                f["crop_mode"] = gr.Radio(label="Crops", choices=[("whole image", "none"), ("five crops", "five")],
                                          value=defaults.crop_mode, elem_id="crop-mode")
                f["flip"] = gr.Checkbox(label="Average with the flipped image", value=defaults.flip,
                                        elem_id="flip")
                f["seed"] = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="seed")
                f["crf_resolution"] = gr.Textbox(label="CRF resolution (short side, px)", value="",
                                                 placeholder="same as resolution; 0 = full size",
                                                 elem_id="crf-resolution")
            gr.Markdown("Loss shifts: leave empty to choose them automatically from feature statistics.")
            with gr.Row():
                f["shift_self"] = gr.Textbox(label="Shift (self)", value="", placeholder="auto",
                                             elem_id="shift-self")
                f["shift_knn"] = gr.Textbox(label="Shift (KNN)", value="", placeholder="auto",
                                            elem_id="shift-knn")
                f["shift_neg"] = gr.Textbox(label="Shift (negative)", value="", placeholder="auto",
                                            elem_id="shift-neg")
            with gr.Row():
                f["weight_self"] = gr.Number(label="Weight (self)", value=defaults.weight_self,
                                             elem_id="weight-self")
                f["weight_knn"] = gr.Number(label="Weight (KNN)", value=defaults.weight_knn,
                                            elem_id="weight-knn")
                f["weight_neg"] = gr.Number(label="Weight (negative)", value=defaults.weight_neg,
                                            elem_id="weight-neg")
        self.form = f
        with gr.Row():
            self.start_btn = gr.Button("Start discovery", variant="primary", elem_id="btn-start")
            self.cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="btn-cancel")
            self.resume_btn = gr.Button("Resume run", elem_id="btn-resume")
        self.status_html = gr.HTML(H.run_status_html(None), elem_id="run-status")
        self.loss_plot = gr.LinePlot(value=None, visible=False, x="step", y="value", color="term",
                                     title="Training loss", x_title="step", y_title="loss",
                                     height=260, elem_id="loss-plot")
        self.sig_state = gr.State(None)      # last polled run state (skip redraws when unchanged)

    @property
    def status_outputs(self) -> list:
        return [self.status_html, self.loss_plot, self.sig_state]

    # ---------------------------------------------------------------- views
    @staticmethod
    def status_signature(info) -> tuple:
        if info is None:
            return H.status_signature(None)
        times = eta.run_times(info)   # while running, the clock changes the view every second
        return (*H.status_signature(info), round(times.elapsed) if info.status == "running" else None)

    def status_views(self, info) -> dict:
        frame = loss_frame(info.history if info is not None else [])
        if info is None:
            html = H.run_status_html(None)
        else:
            html = H.run_status_html(info, eta.run_times(info),
                                     removal.stale_note(removal.removed_in_run(self.ctx, info.id)))
        return {self.status_html: html,
                self.loss_plot: gr.update(value=frame, visible=frame is not None),
                self.sig_state: self.status_signature(info)}

    def form_views(self, params) -> dict:
        """The form shows the settings of the selected run."""
        values = params.to_dict()
        out = {}
        for name, comp in self.form.items():
            v = values.get(name)
            if name == "backbone":
                v = v or ""
            elif name.startswith("shift_") or name == "crf_resolution":
                v = "" if v is None else str(v)
            out[comp] = v
        return out

    def _with_runs(self, info, pid, run_id) -> dict:
        out = self.status_views(info)
        out[self.app.run_dd] = gr.update(choices=H.run_choices(runs.list_runs(self.ctx, pid)), value=run_id)
        return out

    # ---------------------------------------------------------------- handlers
    @guard
    def on_start(self, pid, *values):
        pid = H.as_id(pid, "project")
        if pid is None:
            raise UserError("create or choose a project with images first")
        form = dict(zip(FORM_FIELDS, values))
        form["backbone"] = form["backbone"] or None
        params = RunParams.from_form(form)
        info = runs.start_run(self.ctx, pid, params)
        how = (f"{info.params.steps} training steps, chosen for the corpus size ({runs.AUTO_STEPS_HELP[8:]})"
               if params.steps is None else f"{info.params.steps} training steps")
        gr.Info(f"Run {info.id} started on {H.count(info.n_images, 'image')}; {how}.")
        return {self.app.run_dd: gr.update(choices=H.run_choices(runs.list_runs(self.ctx, pid)), value=info.id)}

    @guard
    def on_cancel(self, pid, run_id):
        pid = H.as_id(pid, "project")
        run_id = H.as_id(run_id, "run")
        if run_id is None:
            raise UserError("no run selected")
        info = runs.cancel_run(self.ctx, run_id)
        gr.Info(f"Run {info.id}: cancelling." if info.status == RunStatus.RUNNING else f"Run {info.id} cancelled.")
        return self._with_runs(info, pid, run_id)

    @guard
    def on_resume(self, pid, run_id):
        pid = H.as_id(pid, "project")
        run_id = H.as_id(run_id, "run")
        if run_id is None:
            raise UserError("no run selected")
        info = runs.resume_run(self.ctx, run_id)
        gr.Info(f"Run {info.id} resumed; finished stages are reused.")
        return self._with_runs(info, pid, run_id)

    def on_tick(self, pid, run_id, sig, version, image_id, op, use_crf):
        """Poll the selected run; redraw only what changed (edits made in other tabs included).
        Never raises (it runs every second)."""
        try:
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                return {self.sig_state: gr.skip()}
            image_id = H.as_id(image_id, "image")
            info = runs.get_run(self.ctx, run_id)
            if (info.status == "done" and version is not None and info.mapping_version != version
                    and sig is not None and len(sig) > 1 and sig[0] == info.id):
                gr.Info("The names of this run were changed in another tab; this page shows them now.")
                return self.app.label_views(run_id, image_id, op, use_crf, None)
            new_sig = self.status_signature(info)
            if sig is not None and new_sig == tuple(sig):
                return {self.sig_state: gr.skip()}
            out = self.status_views(info)
            same_run = sig is not None and len(sig) > 1 and sig[0] == info.id
            if same_run and sig[1] != info.status:
                out[self.app.run_dd] = gr.update(choices=H.run_choices(runs.list_runs(self.ctx, info.project_id)),
                                                 value=run_id)
                if info.status == RunStatus.DONE:
                    out.update(self.app.run_views(run_id))
                    gr.Info(f"Run {info.id} finished: {info.params.n_clusters} clusters to name.")
                elif info.status == RunStatus.FAILED:
                    gr.Warning(f"Run {info.id} failed: {info.error}")
            return out
        except Exception as exc:  # noqa: BLE001 - shown in the status box, logged once per change
            err_sig = ("error", run_id, str(exc))
            if sig is not None and tuple(sig) == err_sig:
                return {self.sig_state: gr.skip()}
            if isinstance(exc, UserError):
                log.info("polling run %s: %s", run_id, exc)
            else:
                log.exception("polling run %s failed", run_id)
            return {self.status_html: f'<p class="stego-error">Could not read run {run_id}: {H.esc(exc)}</p>',
                    self.sig_state: err_sig}

    @guard
    def on_status(self, run_id):
        run_id = H.as_id(run_id, "run")
        return self.status_views(runs.get_run(self.ctx, run_id) if run_id is not None else None)

    def wire(self) -> None:
        app = self.app
        self.tab.select(self.on_status, app.run_dd, self.status_outputs, show_progress="hidden")
        self.start_btn.click(self.on_start, [app.project_dd] + [self.form[k] for k in FORM_FIELDS], [app.run_dd])
        self.cancel_btn.click(self.on_cancel, [app.project_dd, app.run_dd], self.status_outputs + [app.run_dd])
        self.resume_btn.click(self.on_resume, [app.project_dd, app.run_dd], self.status_outputs + [app.run_dd])
        self.timer = gr.Timer(1.0)
        # (not the "Show clusters" boxes: a poll racing a run switch would fail Gradio's choice check)
        ex = app.explore
        self.timer.tick(self.on_tick, [app.project_dd, app.run_dd, self.sig_state, app.clusters.shown_version,
                                       ex.image_dd, ex.opacity, ex.crf], app.run_outputs, show_progress="hidden")
