"""Browser pieces for naming many clusters, refining with names and click-to-find (issue 12).

Wiring only, like the rest of the UI: every handler calls stego_app.groups, labels,
refinement or found and formats the result. Three panels:

- ``NamingPanel`` (Clusters tab): share of pixels named, quick naming (type a name, press
  Enter, the next unnamed cluster in tree order comes up), groups of similar clusters named in
  one action, merge suggestions, removing found clusters; the cards are shown by group.
- ``RefinePanel`` (Clusters tab): start / cancel / resume propagation, its progress, whether
  the refined maps are stale (names changed or corrections imported since).
- ``FindPanel`` (Explore tab): click the image -> heat map of this image, best matches of
  the corpus; the region above a threshold becomes a new (named) cluster.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from core.constants import REFINE_OPTIONS
from stego_app import corrections, edit_versions, found, groups, refinement
from stego_app.labels import mapping, views
from stego_app.ui import formatting as H
from stego_app.errors import UserError
from stego_app.ui.common import ERROR_TOAST_S, job_buttons, show_refused

log = logging.getLogger(__name__)

CSS = """
.stego-progress-bar { background: var(--neutral-200); border-radius: 4px; height: 10px; overflow: hidden;
                      max-width: 760px; display: flex; }
.stego-progress-named { background: #2ca02c; height: 100%; }
.stego-progress-ignored { background: #999; height: 100%; }
.stego-group { border: 1px dashed var(--border-color-primary); border-radius: 10px; padding: 6px 8px;
               margin-bottom: 10px; }
.stego-group-head { font-weight: 600; margin-bottom: 6px; }
.stego-group .stego-cards { grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 6px; }
.stego-group .stego-card { padding: 5px; }
.stego-group .stego-card-examples { flex-wrap: nowrap; overflow: hidden; }
.stego-group .stego-card-examples img { height: 56px; max-width: 76px; }
.stego-focus { border: 2px solid var(--color-accent); border-radius: 8px; padding: 8px; }
.stego-focus .stego-card-examples img { height: 120px; }
.stego-refine-state { margin: 4px 0; }
"""


def progress_html(p: groups.NamingProgress | None) -> str:
    if p is None:
        return '<div id="naming-progress-inner" class="stego-muted">No finished run selected.</div>'
    return (f'<div id="naming-progress-inner" data-named="{p.named_share:.4f}" data-unnamed="{p.n_unnamed}">'
            f'<div class="stego-progress-bar"><div class="stego-progress-named" style="width:{100 * p.named_share:.1f}%">'
            f'</div><div class="stego-progress-ignored" style="width:{100 * p.ignored_share:.1f}%"></div></div>'
            f'<div><b>{H.esc(p.text)}</b></div></div>')


def grouped_cards_html(gs: list[groups.ClusterGroup], clusters: list[mapping.ClusterInfo],
                       example_url: Callable[[Any, int], str | None], max_examples: int = 4) -> str:
    """The cluster cards, one box per group of similar clusters (tree order)."""
    if not clusters:
        return H.cluster_cards_html([], example_url, max_examples)
    by_index = {c.index: c for c in clusters}
    out = ['<div id="cluster-cards">']
    for g in gs:
        title = "Found by clicking" if g.found else f"Group {g.id}"
        names = f" · labels: {H.esc(', '.join(g.label_names))}" if g.label_names else ""
        todo = f" · {len(g.unnamed)} unnamed" if g.unnamed else " · all named"
        n = len(g.cluster_indices)
        out.append(f'<div class="stego-group" data-group="{g.id}"><div class="stego-group-head">{title} · '
                   f'{H.format_share(g.share)} · {n} cluster{"s" if n != 1 else ""}{names}{todo}</div>'
                   '<div class="stego-cards">')
        out += [H.cluster_card_html(by_index[i], example_url, max_examples) for i in g.cluster_indices
                if i in by_index]
        out.append("</div></div>")
    out.append("</div>")
    return "".join(out)


def group_choices(gs: list[groups.ClusterGroup]) -> list[tuple[str, int]]:
    out = []
    for g in gs:
        names = ", ".join(g.label_names) or "unnamed"
        kind = "found" if g.found else f"group {g.id}"
        out.append((f"{kind} · {H.format_share(g.share)} · {' '.join(f'#{i}' for i in g.cluster_indices)} · {names}",
                    g.id))
    return out


def suggestion_choices(sugg: list[groups.MergeSuggestion]) -> list[tuple[str, str]]:
    return [(s.text, f"{s.cluster_index}|{s.similar_to[0]}|{s.label_name or ''}") for s in sugg]


def refine_html(state: refinement.RefinedState | None, job: refinement.RefinementInfo | None) -> str:
    if state is None:
        return '<div id="refine-status-box" data-status="none" class="stego-muted">No finished run selected.</div>'
    status = job.status if job is not None else "none"
    lines = [f'<div class="stego-refine-state">{H.esc(state.text)}</div>']
    if job is not None:
        word = H.STATUS_WORDS.get(job.status, job.status)
        stage = refinement.STAGE_WORDS.get(job.stage or "", job.stage or "")
        detail = f" · {stage} · {job.progress:.0%}" if job.is_active and job.stage else ""
        err = f' <span class="stego-error">{H.esc(job.error)}</span>' if job.error else ""
        lines.append(f'<div>Refinement {job.id}: <span class="stego-state-{H.esc(job.status)}">{H.esc(word)}</span>'
                     f'{H.esc(detail)}{err}</div>')
        if job.is_active:
            lines.append(f'<div class="stego-bar" style="max-width:760px"><div class="stego-bar-fill" '
                         f'style="width:{100 * job.progress:.1f}%"></div></div>')
    return (f'<div id="refine-status-box" data-status="{H.esc(status)}" '
            f'data-stale="{int(state.stale)}" data-available="{int(state.available)}">' + "".join(lines) + "</div>")


def focus_html(c: mapping.ClusterInfo | None, urls: list[str], labels_known: list[str]) -> str:
    if c is None:
        return ('<div id="quick-focus-inner" class="stego-focus" data-cluster="">Every cluster is named or ignored. '
                'Refine with names below, or check images in Explore.</div>')
    imgs = "".join(f'<img src="{H.esc(u)}" alt="example">' for u in urls) or '<span class="stego-muted">no examples</span>'
    known = (f'<div class="stego-muted">labels so far: {H.esc(", ".join(labels_known))}</div>' if labels_known else "")
    return (f'<div id="quick-focus-inner" class="stego-focus" data-cluster="{c.index}">'
            f'<div class="stego-card-head">{H.swatch(c.colour, 18)}<span class="stego-card-label">Cluster #{c.index}'
            f'</span><span class="stego-card-share">{H.format_share(c.share)}</span></div>'
            f'<div class="stego-card-examples">{imgs}</div>{known}</div>')


@dataclass
class NamingPanel:
    """Clusters tab additions (build inside the tab, before the cards)."""

    ctx: Any
    progress: Any
    focus: Any
    focus_state: Any
    quick_name: Any
    skip_btn: Any
    quick_ignore_btn: Any
    n_groups: Any
    group_dd: Any
    group_name: Any
    group_btn: Any
    suggestions: Any
    suggestion_name: Any
    accept_btn: Any
    remove_found_btn: Any

    @classmethod
    def build(cls, ctx) -> "NamingPanel":
        progress = gr.HTML(progress_html(None), elem_id="naming-progress")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                focus = gr.HTML(focus_html(None, [], []), elem_id="quick-focus")
            with gr.Column(scale=1):
                quick_name = gr.Textbox(label="Name this cluster, press Enter", elem_id="quick-name",
                                        placeholder="e.g. road (an existing name merges into it)", autofocus=False)
                with gr.Row():
                    skip_btn = gr.Button("Skip", elem_id="btn-quick-skip", size="sm")
                    quick_ignore_btn = gr.Button("Ignore it", elem_id="btn-quick-ignore", size="sm")
        focus_state = gr.State(None)
        with gr.Accordion("Groups of similar clusters and merge suggestions", open=True, elem_id="groups-panel"):
            with gr.Row(equal_height=True):
                n_groups = gr.Slider(label="Number of groups", minimum=1, maximum=2, step=1, value=1,
                                     elem_id="n-groups", scale=1)
                group_dd = gr.Dropdown(label="Group", choices=[], elem_id="group-select", scale=3)
                group_name = gr.Textbox(label="Name the group's unnamed clusters", elem_id="group-name", scale=2,
                                        placeholder="type and press Enter")
                group_btn = gr.Button("Name group", variant="primary", elem_id="btn-name-group", scale=0,
                                      min_width=120)
            with gr.Row(equal_height=True):
                suggestions = gr.Radio(label="These look alike: merge?", choices=[], elem_id="merge-suggestions",
                                       scale=4)
                with gr.Column(scale=1):
                    suggestion_name = gr.Textbox(label="Name (for two unnamed clusters)", elem_id="suggestion-name")
                    accept_btn = gr.Button("Accept suggestion", elem_id="btn-accept-suggestion")
                    remove_found_btn = gr.Button("Remove selected found clusters", elem_id="btn-remove-found",
                                                 size="sm")
        return cls(ctx, progress, focus, focus_state, quick_name, skip_btn, quick_ignore_btn, n_groups, group_dd,
                   group_name, group_btn, suggestions, suggestion_name, accept_btn, remove_found_btn)

    @property
    def outputs(self) -> list:
        return [self.progress, self.focus, self.focus_state, self.n_groups, self.group_dd, self.suggestions]

    def empty(self) -> dict:
        return {self.progress: progress_html(None), self.focus: focus_html(None, [], []), self.focus_state: None,
                self.group_dd: gr.update(choices=[], value=None), self.suggestions: gr.update(choices=[], value=None),
                self.n_groups: gr.update(maximum=2, value=1)}

    def focus_views(self, run_id: int, focus: int | None, clusters=None) -> dict:
        clusters = clusters if clusters is not None else mapping.list_clusters(self.ctx, run_id)
        c = next((x for x in clusters if x.index == focus), None) if focus is not None else None
        urls = []
        if c is not None:
            try:
                urls = [H.image_data_uri(a) for _, a in views.cluster_examples(self.ctx, run_id, c.index, n=4,
                                                                                  size=200)]
            except UserError as exc:
                log.warning("no examples for cluster %s: %s", c.index, exc)
        return {self.focus: focus_html(c, urls, H.label_names(clusters)), self.focus_state: focus}

    def views(self, run_id: int, clusters=None, focus: int | None = None) -> dict:
        """Everything this panel shows for a finished run (focus: None = first unnamed cluster)."""
        clusters = clusters if clusters is not None else mapping.list_clusters(self.ctx, run_id)
        gs = groups.list_groups(self.ctx, run_id)
        k = sum(1 for g in gs if not g.found for _ in g.cluster_indices)
        todo = {c.index for c in clusters if c.label_name is None and not c.ignored}
        if focus is None or focus not in todo:
            focus = groups.next_unnamed(self.ctx, run_id, after=focus)
        out = {self.progress: progress_html(groups.naming_progress(self.ctx, run_id)),
               self.group_dd: gr.update(choices=group_choices(gs), value=None),
               self.suggestions: gr.update(choices=suggestion_choices(groups.merge_suggestions(self.ctx, run_id)),
                                           value=None),
               self.n_groups: gr.update(minimum=1, maximum=max(2, k), value=sum(1 for g in gs if not g.found))}
        out.update(self.focus_views(run_id, focus, clusters))
        return out

    def cards_html(self, run_id: int, clusters, example_url, max_examples: int) -> str:
        return grouped_cards_html(groups.list_groups(self.ctx, run_id), clusters, example_url, max_examples)

    def wire(self, guard, run_dd, version_state, cluster_sel, explore_inputs: list, label_outputs: list,
             label_views: Callable[..., dict]) -> None:
        """Every edit here states the mapping version its page showed (``version_state``): an edit
        made on names another tab has changed since is refused and the page shows the current ones."""
        ctx = self.ctx

        def refreshed(run_id, image_id, op, use_crf, visible, focus=None) -> dict:
            out = label_views(run_id, image_id, op, use_crf, visible)
            if focus is not None:
                out.update(self.views(run_id, focus=focus))
            return out

        def edited(run_id, version, image_id, op, use_crf, visible, action: Callable[[], Any],
                   next_focus: Callable[[], int | None] | None = None, clear=None) -> dict:
            """Run ``action`` on ``version`` of the mapping; a stale page gets the current state."""
            image_id = H.as_id(image_id, "image")
            try:
                with edit_versions.expect_version(version):
                    action()
            except edit_versions.StaleMapping as exc:
                gr.Warning(str(exc), duration=ERROR_TOAST_S, title="Not saved")
                return refreshed(run_id, image_id, op, use_crf, visible, focus=None)
            out = refreshed(run_id, image_id, op, use_crf, visible,
                            focus=next_focus() if next_focus is not None else None)
            if clear is not None:
                out[clear] = ""
            return out

        def need_run(run_id):
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                raise UserError("no run selected")
            return run_id

        @guard
        def on_quick(run_id, version, focus, name, image_id, op, use_crf, visible):
            run_id = need_run(run_id)
            if focus is None:
                raise UserError("every cluster is named or ignored already")
            if not (name or "").strip():
                raise UserError("type a name, then press Enter")
            def action():
                note = mapping.naming_note(mapping.list_clusters(ctx, run_id), [int(focus)], name,
                                           respelling_only=True)   # the keyboard flow says only what changes elsewhere
                mapping.name_cluster(ctx, run_id, int(focus), name)
                if note:
                    gr.Info(f"Cluster #{int(focus)}: {note}")

            return edited(run_id, version, image_id, op, use_crf, visible, action,
                          lambda: groups.next_unnamed(ctx, run_id, after=int(focus)), clear=self.quick_name)

        @guard
        def on_skip(run_id, focus):
            run_id = need_run(run_id)
            return self.focus_views(run_id, groups.next_unnamed(ctx, run_id, after=focus))

        @guard
        def on_quick_ignore(run_id, version, focus, image_id, op, use_crf, visible):
            run_id = need_run(run_id)
            if focus is None:
                raise UserError("no cluster to ignore")
            return edited(run_id, version, image_id, op, use_crf, visible,
                          lambda: mapping.ignore_cluster(ctx, run_id, int(focus)),
                          lambda: groups.next_unnamed(ctx, run_id, after=int(focus)))

        @guard
        def on_group(run_id, version, group_id, name, image_id, op, use_crf, visible):
            run_id = need_run(run_id)
            if group_id is None or group_id == "":
                raise UserError("choose a group first")

            def action():
                clusters = groups.name_group(ctx, run_id, int(group_id), name)
                clean = " ".join((name or "").split())
                n = sum(1 for c in clusters if (c.label_name or "").lower() == clean.lower())
                gr.Info(f"{H.count(n, 'cluster')} {'is' if n == 1 else 'are'} now '{clean}'.")

            return edited(run_id, version, image_id, op, use_crf, visible, action, clear=self.group_name)

        @guard
        def on_n_groups(run_id, n, image_id, op, use_crf, visible):
            run_id = need_run(run_id)
            groups.set_n_groups(ctx, run_id, int(n))
            return refreshed(run_id, H.as_id(image_id, "image"), op, use_crf, visible)

        @guard
        def on_accept(run_id, version, value, name, image_id, op, use_crf, visible):
            run_id = need_run(run_id)
            if not value:
                raise UserError("choose a suggestion first")
            u, v, label = str(value).split("|", 2)

            def action():
                groups.accept_suggestion(ctx, run_id, int(u), int(v), label or None, name)
                merged = " ".join((name or "").split())
                gr.Info(f"Cluster #{u} is now '{label}'." if label else
                        f"Clusters #{u} and #{v} merged" + (f" into '{merged}'." if merged else "."))

            return edited(run_id, version, image_id, op, use_crf, visible, action, clear=self.suggestion_name)

        @guard
        def on_remove_found(run_id, version, selected, image_id, op, use_crf, visible):
            run_id = need_run(run_id)
            if not selected:
                raise UserError("tick the found clusters to remove under the cards first")

            def action():
                for i in selected:
                    found.remove_cluster(ctx, run_id, int(i))

            return edited(run_id, version, image_id, op, use_crf, visible, action)

        quick_inputs = [run_dd, version_state, self.focus_state, self.quick_name] + explore_inputs
        self.quick_name.submit(on_quick, quick_inputs, label_outputs + [self.quick_name])
        self.skip_btn.click(on_skip, [run_dd, self.focus_state], [self.focus, self.focus_state])
        self.quick_ignore_btn.click(on_quick_ignore, [run_dd, version_state, self.focus_state] + explore_inputs,
                                    label_outputs)
        group_inputs = [run_dd, version_state, self.group_dd, self.group_name] + explore_inputs
        self.group_btn.click(on_group, group_inputs, label_outputs + [self.group_name])
        self.group_name.submit(on_group, group_inputs, label_outputs + [self.group_name])
        self.n_groups.release(on_n_groups, [run_dd, self.n_groups] + explore_inputs, label_outputs,
                              trigger_mode="always_last")
        self.accept_btn.click(on_accept, [run_dd, version_state, self.suggestions, self.suggestion_name]
                              + explore_inputs, label_outputs + [self.suggestion_name])
        self.remove_found_btn.click(on_remove_found, [run_dd, version_state, cluster_sel] + explore_inputs,
                                    label_outputs)


@dataclass
class RefinePanel:
    """Refine with names: start / cancel / resume and its state (Clusters tab)."""

    ctx: Any
    status: Any
    start_btn: Any
    cancel_btn: Any
    resume_btn: Any
    sig: Any
    steps: Any = None
    dense: Any = None
    corr_file: Any = None
    corr_btn: Any = None
    corr_info: Any = None

    @classmethod
    def build(cls, ctx) -> "RefinePanel":
        from core.refinement import RefineConfig

        defaults = RefineConfig()
        gr.Markdown("### Refine with names\nTrains a pixel classifier on the backbone features from the named "
                    "clusters (and the images checked in Explore or corrected in your annotation tool; corrected "
                    "images also teach it, pixel by pixel, details finer than the clusters), then "
                    "redraws every image with it. Overlays and exports use the refined maps once they are "
                    "ready; run it again after more naming.")
        status = gr.HTML(refine_html(None, None), elem_id="refine-status")
        with gr.Row():
            label, info = REFINE_OPTIONS["steps"]
            steps = gr.Number(label=label, info=info, value=defaults.steps, precision=0, minimum=1,
                              elem_id="refine-steps", scale=1)
            label, info = REFINE_OPTIONS["dense"]
            dense = gr.Checkbox(label=label, info=info, value=refinement.dense_by_default(ctx.config),
                                elem_id="refine-dense", scale=2)
        with gr.Row():
            start_btn = gr.Button("Refine with names", variant="primary", elem_id="btn-refine")
            cancel_btn = gr.Button("Cancel refinement", variant="stop", elem_id="btn-refine-cancel",
                                   interactive=False)
            resume_btn = gr.Button("Resume refinement", elem_id="btn-refine-resume", interactive=False)
        with gr.Accordion("Import corrected annotations", open=False, elem_id="corrections"):
            gr.Markdown("Correct a few exported images in your annotation tool (CVAT, Label Studio, any COCO "
                        "tool), export them as COCO (from Label Studio also its JSON export) and import the file "
                        "here: those images become checked, and "
                        "the next refinement learns from them and keeps them as drawn. Categories are matched "
                        "to this run's label names, images to their file names. Which images? Export → *More "
                        "formats and options* → *images to correct first* exports the few that stand for the "
                        "rest (one typical image of each kind of scene); after an import, the same export gives the "
                        "next batch, leaving out the images corrected already.")
            corr_file = gr.File(label="COCO instances .json, the tool's .zip, or Label Studio JSON",
                                file_types=[".json", ".zip"], file_count="single", elem_id="corrections-file", height=140)
            corr_btn = gr.Button("Import corrections", elem_id="btn-import-corrections")
            corr_info = gr.Markdown("", elem_id="corrections-info")
        return cls(ctx, status, start_btn, cancel_btn, resume_btn, gr.State(None), steps, dense,
                   corr_file, corr_btn, corr_info)

    def corrections_text(self, run_id: int) -> str:
        n = len(corrections.corrected_images(self.ctx, run_id))
        return (f"{n} image{'s' if n != 1 else ''} of this run {'have' if n != 1 else 'has'} imported corrections."
                if n else "No corrections imported yet.")

    @property
    def outputs(self) -> list:
        return [self.status, self.sig, self.start_btn, self.cancel_btn, self.resume_btn, self.corr_info]

    def empty(self) -> dict:
        return {self.status: refine_html(None, None), self.sig: None, self.corr_info: "",
                self.start_btn: gr.update(interactive=True), **job_buttons(self.cancel_btn, self.resume_btn, None)}

    def views(self, run_id: int, corrections_line: bool = True) -> dict:
        """The refine status, its poll key and job buttons; and the corrections line unless polling
        (a poll keeps the last import's message on the page)."""
        state = refinement.refined_state(self.ctx, run_id)
        job = refinement.latest_refinement(self.ctx, run_id)
        out = {self.status: refine_html(state, job), self.sig: refinement.poll_key(self.ctx, run_id),
               # one refinement at a time: starting is pressable again once it is no longer queued or running
               self.start_btn: gr.update(interactive=job is None or not job.is_cancellable),
               **job_buttons(self.cancel_btn, self.resume_btn, job)}
        if corrections_line:
            out[self.corr_info] = self.corrections_text(run_id)
        return out

    def wire(self, guard, run_dd, timer, run_state) -> None:
        ctx = self.ctx

        @guard
        def on_start(run_id, steps, dense):
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                raise UserError("no run selected")
            params = {"dense": bool(dense), **({"steps": int(steps)} if steps else {})}
            job = refinement.start_refinement(ctx, run_id, params)
            gr.Info(f"Refinement {job.id} started.")
            return self.views(run_id)

        def on_latest(action: Callable[[Any, int], Any], what: str):
            @guard
            def handler(run_id):
                run_id = H.as_id(run_id, "run")
                job = refinement.latest_refinement(ctx, run_id) if run_id is not None else None
                if job is None:
                    raise UserError(f"this run has no refinement to {what}")
                action(ctx, job.id)
                gr.Info(f"Refinement {job.id}: {'cancelling' if what == 'cancel' else 'resumed'}.")
                return self.views(run_id)
            return handler

        @guard
        def on_import(run_id, file):
            run_id = H.as_id(run_id, "run")
            if run_id is None:
                raise UserError("no run selected")
            try:
                if not file:
                    raise UserError("choose the COCO .json (or the annotation tool's .zip, or Label Studio's "
                                    "JSON export) first")
                report = corrections.import_corrections(ctx, run_id, Path(getattr(file, "name", file)))
            except UserError as exc:             # the toast fades; the line under the button keeps it
                show_refused(exc)
                return {self.corr_info: f"Not imported: {exc} {self.corrections_text(run_id)}"}
            gr.Info(report.summary())
            return {**self.views(run_id), self.corr_info: report.summary() + " " + self.corrections_text(run_id)}

        on_cancel = on_latest(refinement.cancel_refinement, "cancel")
        on_resume = on_latest(refinement.resume_refinement, "resume")

        def on_tick(run_id, sig):
            """Poll the latest refinement (cheap; only its own status box). Never raises."""
            try:
                run_id = H.as_id(run_id, "run")
                key = refinement.poll_key(ctx, run_id) if run_id is not None else None
                if key is None or (sig is not None and list(sig) == key):
                    return {self.sig: gr.skip()}
                out = self.views(run_id, corrections_line=False)     # only when something it shows changed
                new = out[self.sig]
                if sig is not None and new is not None and sig[0] != new[0] and new[0] is not None:
                    gr.Info("Refined maps are ready: overlays and exports use them now (Explore shows them "
                            "when you open it).")
                return out
            except Exception:  # noqa: BLE001 - polled every second; logged, shown on the next change
                log.exception("polling the refinement of run %s failed", run_id)
                return {self.sig: gr.skip()}

        self.start_btn.click(on_start, [run_dd, self.steps, self.dense], self.outputs)
        self.cancel_btn.click(on_cancel, [run_dd], self.outputs)
        self.resume_btn.click(on_resume, [run_dd], self.outputs)
        self.corr_btn.click(on_import, [run_dd, self.corr_file], self.outputs)
        timer.tick(on_tick, [run_state, self.sig], self.outputs, show_progress="hidden")   # not run_dd: see App


@dataclass
class FindPanel:
    """Click to find more of a thing (Explore tab, below the overlay)."""

    ctx: Any
    info: Any
    heat: Any
    matches: Any
    threshold: Any
    name: Any
    create_btn: Any
    state: Any

    @classmethod
    def build(cls, ctx) -> "FindPanel":
        gr.Markdown("### Find more of a thing\nClick a point of the original image: the heat map shows how "
                    "strongly every location corresponds to it, here and in the best-matching images. The "
                    "outlined region (similarity above the threshold) can become a new cluster, or join a label.")
        info = gr.Markdown("Click the original image to start.", elem_id="find-info")
        with gr.Row():
            heat = gr.Image(label="Correspondence to the clicked point", interactive=False, elem_id="find-heat",
                            show_download_button=False, height=360)
            matches = gr.Gallery(label="Best matches in other images", columns=4, height=360,
                                 allow_preview=False, elem_id="find-matches", object_fit="contain",
                                 show_download_button=False)
        with gr.Row(equal_height=True):
            threshold = gr.Slider(label="Similarity threshold", minimum=0.0, maximum=1.0, step=0.01,
                                  value=found.DEFAULT_THRESHOLD, elem_id="find-threshold", scale=2)
            name = gr.Textbox(label="Name of the found region", elem_id="find-name", scale=2,
                              placeholder="e.g. pole; an existing name adds it to that label")
            create_btn = gr.Button("Make it a cluster", variant="primary", elem_id="btn-find-create", scale=1)
        return cls(ctx, info, heat, matches, threshold, name, create_btn, gr.State(None))

    def _query(self, run_id: int, state: dict, threshold: float) -> dict:
        res = found.query(self.ctx, run_id, int(state["image_id"]), float(state["x"]), float(state["y"]),
                          shown_size=tuple(state["shown"]), threshold=float(threshold))
        state = {**state, "cell": list(res.cell)}
        text = (f"Point ({state['x']:.0f}, {state['y']:.0f}) = token {res.cell} of a {res.grid[0]}x{res.grid[1]} "
                f"grid · about **{res.corpus_share:.1%}** of all pixels reach {res.threshold:.2f}")
        return {self.info: text, self.heat: res.overlay, self.state: state,
                self.matches: [(m.thumbnail, f"{m.name} · best {m.similarity:.2f} · "
                                             f"{H.format_share(m.coverage)} above threshold") for m in res.matches]}

    def wire(self, guard, run_dd, image_dd, click_images: list, explore_inputs: list, label_outputs: list,
             label_views: Callable[..., dict], display_max_side: int) -> None:
        ctx = self.ctx
        from stego_app import ingest
        from stego_app.thumbnails import fit_within

        @guard
        def on_click(run_id, image_id, threshold, evt: gr.SelectData):
            run_id = H.as_id(run_id, "run")
            image_id = H.as_id(image_id, "image")
            if run_id is None or image_id is None or evt is None or evt.index is None:
                return gr.skip()
            x, y = (float(v) for v in evt.index[:2])
            img = ingest.get_image(ctx, image_id)
            w, h = fit_within(img.width, img.height, display_max_side)
            return self._query(run_id, {"image_id": image_id, "x": x, "y": y, "shown": [h, w]}, threshold)

        @guard
        def on_threshold(run_id, state, threshold):
            run_id = H.as_id(run_id, "run")
            if run_id is None or not state:
                return gr.skip()
            return self._query(run_id, state, threshold)

        @guard
        def on_create(run_id, state, threshold, name, image_id, op, use_crf, visible):
            run_id = H.as_id(run_id, "run")
            if run_id is None or not state or state.get("cell") is None:
                raise UserError("click a point of the original image first")
            info = found.create_cluster(ctx, run_id, int(state["image_id"]), tuple(state["cell"]),
                                        float(threshold), name)
            gr.Info(f"Cluster #{info.index} made from the clicked region ({H.format_share(info.share)} of pixels)"
                    + (f", named '{info.label_name}'." if info.label_name else "; name it in the Clusters tab."))
            shown = None if visible is None else [*visible, info.index]     # the new cluster is shown
            out = label_views(run_id, H.as_id(image_id, "image"), op, use_crf, shown)
            out[self.name] = ""
            return out

        for img in click_images:
            img.select(on_click, [run_dd, image_dd, self.threshold], [self.info, self.heat, self.matches, self.state],
                       trigger_mode="always_last")                     # the last point clicked wins
        self.threshold.release(on_threshold, [run_dd, self.state, self.threshold],
                               [self.info, self.heat, self.matches, self.state], trigger_mode="always_last")
        self.create_btn.click(on_create, [run_dd, self.state, self.threshold, self.name] + explore_inputs,
                              label_outputs + [self.name])
