"""Tab 2 · Discover: the run settings form, start / cancel / resume, live progress and loss."""
from __future__ import annotations

import logging

import gradio as gr
import pandas as pd

from stego_app import eta, removal, runs
from stego_app.errors import UserError
from stego_app.models import RunStatus
from core.settings import GROUPS, Spec, spec, specs
from stego_app.ui import formatting as H
from stego_app.ui.common import guard, job_buttons

log = logging.getLogger(__name__)

# The form's fields in the order on_start receives them (after the project): the whole schema.
FORM_FIELDS = tuple(name for name, _, _, _ in specs())
PER_ROW = 4


def setting_input(ctx, name: str, kind: type, default, sp: Spec) -> gr.components.Component:
    """The form input of one setting, from its schema entry (label, help, limits, choices)."""
    elem_id = name.replace("_", "-")
    limits = sp.limits_text()
    info = sp.help + (f" ({limits})" if limits and not sp.choices else "")
    if name == "backbone":
        return gr.Dropdown(label=sp.label, choices=runs.backbone_choices(ctx), value="", elem_id=elem_id,
                           info=sp.help)
    if kind is bool:
        return gr.Checkbox(label=sp.label, value=default, elem_id=elem_id, info=sp.help)
    if sp.choices is not None:
        labels = sp.choice_labels or sp.choices
        return gr.Radio(label=sp.label, choices=list(zip(labels, sp.choices)), value=default, elem_id=elem_id,
                        info=sp.help)
    if sp.auto is not None:        # empty = automatic: a text box that may stay blank
        return gr.Textbox(label=sp.label, value="" if default is None else str(default), placeholder="auto",
                          lines=1, max_lines=1, elem_id=elem_id, info=f"{info}; empty = {sp.auto}")
    # no minimum/maximum on the component: Gradio would refuse out-of-range values with a bare
    # error; the schema's check names the setting and its limits instead (the value stays)
    return gr.Number(label=sp.label, value=default, precision=0 if kind is int else None, elem_id=elem_id,
                     info=info)


def loss_frame(history) -> pd.DataFrame | None:
    """Long-format loss history, or None when there is none yet.

    (An empty DataFrame would leave Gradio 5.50's LinePlot blank even after later updates.)
    """
    rows = H.loss_rows(history)
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "value", "term"])
    return frame.astype({"step": "int64", "value": "float64", "term": "str"})


def loss_x_range(info) -> list[float] | None:
    """The loss plot's x axis spans the run's training steps (whole-step ticks; the line grows
    toward the end as the run trains)."""
    steps = getattr(getattr(info, "params", None), "steps", None)
    return [0, int(steps)] if isinstance(steps, int) and steps > 0 else None


class DiscoverTab:
    """The Discover tab's components (built in the current gr.Tab) and handlers."""

    def __init__(self, app, tab):
        self.app, self.ctx, self.tab = app, app.ctx, tab
        f: dict[str, gr.components.Component] = {}

        def rows(group: str) -> None:
            entries = list(specs(group))
            for start in range(0, len(entries), PER_ROW):
                with gr.Row():
                    for name, kind, default, sp in entries[start:start + PER_ROW]:
                        f[name] = setting_input(self.ctx, name, kind, default, sp)

        rows("basic")
        with gr.Accordion(GROUPS["training"], open=False, elem_id="advanced"):
            rows("training")
            gr.Markdown(f"**{GROUPS['loss']}**: leave a shift empty to choose it automatically from "
                        "feature statistics.")
            rows("loss")
        self.form = f
        with gr.Row():
            self.start_btn = gr.Button("Start discovery", variant="primary", elem_id="btn-start")
            self.cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="btn-cancel", interactive=False)
            self.resume_btn = gr.Button("Resume run", elem_id="btn-resume", interactive=False)
        self.status_html = gr.HTML(H.run_status_html(None), elem_id="run-status")
        self.loss_plot = gr.LinePlot(value=None, visible=False, x="step", y="value", color="term",
                                     title="Training loss", x_title="step", y_title="loss",
                                     height=260, elem_id="loss-plot")
        self.sig_state = gr.State(None)      # last polled run state (skip redraws when unchanged)

    @property
    def status_outputs(self) -> list:
        return [self.status_html, self.loss_plot, self.sig_state, self.cancel_btn, self.resume_btn]

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
                self.loss_plot: gr.update(value=frame, visible=frame is not None, x_lim=loss_x_range(info)),
                self.sig_state: self.status_signature(info),
                **job_buttons(self.cancel_btn, self.resume_btn, info)}

    def form_views(self, params) -> dict:
        """The form shows the settings of the selected run."""
        values = params.to_dict()
        out = {}
        for name, kind, default, sp in specs():
            v = values.get(name)
            if name == "backbone" or sp.auto is not None:      # text inputs: empty = automatic
                v = "" if v is None else str(v)
            out[self.form[name]] = v
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
        params = runs.parse_form(dict(zip(FORM_FIELDS, values)))
        info = runs.start_run(self.ctx, pid, params)
        how = (f"{info.params.steps} training steps, chosen for the corpus size ({spec('steps').auto})"
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
            sent = self.app.shown_versions.sent(run_id)   # this tab's own edit may still be on its way
            if (info.status == "done" and version is not None and info.mapping_version != version
                    and (sent is None or info.mapping_version > sent)
                    and sig is not None and len(sig) > 1 and sig[0] == info.id):
                gr.Info("The names of this run were changed in another tab; this page shows them now.")
                return self.app.label_views(run_id, image_id, op, use_crf, None)
            new_sig = self.status_signature(info)
            if sig is not None and new_sig == tuple(sig):
                return {self.sig_state: gr.skip()}
            out = self.status_views(info)
            same_run = sig is not None and len(sig) > 1 and sig[0] == info.id
            if same_run and sig[1] != info.status:
                out[self.app.run_dd] = gr.update(choices=H.run_choices(runs.list_runs(self.ctx, info.project_id)))
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
        self.timer.tick(self.on_tick, [app.project_dd, app.run_state, self.sig_state, app.clusters.shown_version,
                                       ex.image_dd, ex.opacity, ex.crf], app.run_outputs, show_progress="hidden")
