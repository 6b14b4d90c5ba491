"""The app's page: header (project, run, refresh), the five tabs, and the events between them.

Thin by design: every handler (in the tab modules stego_app.ui.project / discover /
clusters / explore / export) reads its inputs, calls one or two service functions and
formats the result with stego_app.ui.formatting. What the page shows always comes from
the database, so a reload, a second tab or a restarted server shows the same projects,
runs and names.

Errors a person can fix (UserError) become a toast with the service's message;
anything else is logged with its traceback on the server and shown as a short toast.
"""
from __future__ import annotations

import logging
import secrets

import gradio as gr

from stego_app import projects, runs
from stego_app.labels import mapping
from stego_app.models import RunStatus
from stego_app.ui import formatting as H
from stego_app.ui.clusters import ClustersTab
from stego_app import edit_versions
from stego_app.ui.common import ShownVersions, guard, int_or_none
from stego_app.ui.naming import CSS as NAMING_CSS
from stego_app.ui.discover import DiscoverTab
from stego_app.ui.explore import ExploreTab
from stego_app.ui.export import ExportTab
from stego_app.ui.project import ProjectTab

log = logging.getLogger(__name__)

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
#clusters-html { max-height: 75vh; overflow-y: auto; }   /* 88 cards scroll in their box: the controls stay near */
.stego-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 10px; }
.stego-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px; }
.stego-card-ignored { opacity: .55; }
.stego-card-head { display: flex; align-items: center; gap: 6px; margin-bottom: 6px; }
.stego-card-label { font-weight: 600; flex: 1; min-width: 0; overflow-wrap: anywhere; }   /* long names wrap */
.stego-card-share { font-variant-numeric: tabular-nums; flex-shrink: 0; white-space: nowrap; }
.stego-card-examples { display: flex; gap: 4px; flex-wrap: wrap; }
.stego-card-examples img { height: 96px; max-width: 100%; object-fit: cover; border-radius: 4px; }
.stego-swatch { display: inline-block; border-radius: 3px; border: 1px solid rgba(0,0,0,.3);
                vertical-align: middle; margin-right: 4px; }
.stego-legend { display: flex; flex-wrap: wrap; gap: 4px 16px; padding: 4px 0; }
.stego-legend-item { white-space: nowrap; }
.stego-legend-ignored { opacity: .6; }
.stego-warning { color: #b25d00; font-weight: 600; }
/* polled every second: never dim it while an update is on its way */
#run-status .pending, #run-status.pending, #loss-plot .pending, #loss-plot.pending { opacity: 1 !important; }
#stego-connection-lost { position: fixed; top: 0; left: 0; right: 0; z-index: 10000; padding: 10px 16px;
  background: #d62728; color: #fff; font-weight: 600; text-align: center; display: none; }
body.stego-offline #stego-connection-lost { display: block; }
body.stego-offline #run-status, body.stego-offline #tabs { opacity: .45; pointer-events: none; }
/* until the page's first load has answered, nothing can be pressed: an action sent before it carries no
   project (the header is filled by that load) and would be refused */
body:not(.stego-ready) #tabs, body:not(.stego-ready) #project-select, body:not(.stego-ready) #run-select,
body:not(.stego-ready) #btn-refresh { pointer-events: none; opacity: .6; cursor: progress; }
/* a gallery with few images keeps thumbnail-sized tiles instead of stretching one over the row */
#project-images .grid-container, #explore-gallery .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(96px, 140px)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important; }
/* the theme's checkbox outline is too faint to find on a light background */
.gradio-container input[type="checkbox"], .gradio-container input[type="radio"] {
  border: 1.5px solid var(--neutral-500) !important; }
.gradio-container input[type="checkbox"]:checked, .gradio-container input[type="radio"]:checked {
  border-color: var(--color-accent) !important; }
"""

# A tab whose server went away says so at once (a red bar; the page greyed out, so a stale
# "Running 49%" is not taken for live) and reloads itself once the server answers again:
# Gradio's own event stream does not recover when it breaks mid-event, and all state lives
# in the database anyway. The selected project and run are kept in the URL
# (?project=ID&run=ID, see URL_STATE_JS), so the reload comes back to them.
# A server that is only slow (busy ingesting, say) is not "gone": a ping that times out
# counts only twice in a row, and the page reloads only when the connection was refused or
# the server is another process (a new Gradio app id), never after a slow answer, which
# would throw away the open tab and what was typed into it.
RECONNECT_JS = """
() => {
  const bar = document.createElement("div");
  bar.id = "stego-connection-lost";
  bar.setAttribute("role", "alert");
  bar.textContent = "Connection to the server lost: what you see may be out of date. " +
                    "This page reconnects by itself when the server is back.";
  document.body.appendChild(bar);
  const base = window.location.pathname.endsWith("/") ? window.location.pathname
                                                       : window.location.pathname + "/";
  let appId = null, down = false, refused = false, misses = 0;
  const ping = async () => {
    let answer = null, lost = false;
    try {
      const ctl = new AbortController();
      const timer = setTimeout(() => ctl.abort(), %(timeout_ms)d);
      const r = await fetch(base + "gradio_api/app_id?stego_ping=" + Date.now(),
                            {cache: "no-store", signal: ctl.signal});
      clearTimeout(timer);
      if (r.ok) { answer = String((await r.json()).app_id); } else { lost = r.status >= 500; }
    } catch (e) {
      lost = true;
      if (e.name !== "AbortError") { refused = true; }   // refused or reset, not merely slow
    }
    if (answer !== null) {
      misses = 0;
      const restarted = appId !== null && answer !== appId;
      if (restarted || (down && refused)) { window.location.reload(); return; }
      appId = answer;
      if (down) { down = false; document.body.classList.remove("stego-offline"); }
    } else if (lost) {
      misses += 1;
      if (!down && (refused || misses >= 2)) { down = true; document.body.classList.add("stego-offline"); }
    }
    if (!down) { refused = false; }
    setTimeout(ping, %(interval_ms)d);
  };
  ping();
}
""" % {"timeout_ms": 10_000, "interval_ms": 2_000}

# Keeps ?project=ID&run=ID in the address bar (no reload), so a reload, a restart or a
# copied link opens the same project and run.
URL_STATE_JS = """
(project, run) => {
  const url = new URL(window.location.href);
  for (const [key, value] of [["project", project], ["run", run]]) {
    if (value === null || value === undefined || value === "") { url.searchParams.delete(key); }
    else { url.searchParams.set(key, String(value)); }
  }
  window.history.replaceState(null, "", url.toString());
  return [project, run];
}
"""

# Run once the page's first load has filled the header (see the CSS above).
READY_JS = "() => { document.body.classList.add('stego-ready'); }"

INTRO = """# STEGO class discovery
Find the kinds of regions in your images without labelling anything first, then name them.
**1 Project**: add images · **2 Discover**: run STEGO · **3 Clusters**: name, merge, ignore ·
**4 Explore**: check images · **5 Export**: download COCO."""


def _theme() -> gr.themes.Base:
    """The Soft theme with system fonts: no font download, so it works on offline servers."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


class App:
    """The page bound to one AppContext: the header, the tabs and the views spanning several tabs."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.shown_versions = ShownVersions()     # per browser session: the mapping version last sent
        boot_projects = projects.list_projects(ctx)
        boot_runs = [r for p in boot_projects for r in runs.list_runs(ctx, p.id)]
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            # Choices known at start-up are registered here, so a tab left open while the server
            # restarts still passes Gradio's choice check; each page load replaces them.
            self.project_dd = gr.Dropdown(label="Project", choices=H.project_choices(boot_projects), value=None,
                                          interactive=True, elem_id="project-select", scale=2)
            self.run_dd = gr.Dropdown(label="Discovery run", choices=H.run_choices(boot_runs), value=None,
                                      interactive=True, elem_id="run-select", scale=3,
                                      info="Runs of this project, newest first. Every tab works on this run.")
            # The polls read the selected run from this copy: a poll sent while a project switch
            # empties the run list would otherwise carry a run id Gradio refuses as not a choice.
            self.run_state = gr.State(None)
            self.refresh_btn = gr.Button("↻ Refresh", elem_id="btn-refresh", scale=0, min_width=110)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("1 · Project", id="project", elem_id="tab-project"):
                self.project = ProjectTab(self)
            with gr.Tab("2 · Discover", id="discover", elem_id="tab-discover") as discover_tab:
                self.discover = DiscoverTab(self, discover_tab)
            with gr.Tab("3 · Clusters", id="clusters", elem_id="tab-clusters"):
                self.clusters = ClustersTab(self)
            with gr.Tab("4 · Explore", id="explore", elem_id="tab-explore") as explore_tab:
                self.explore = ExploreTab(self, explore_tab)
            with gr.Tab("5 · Export", id="export", elem_id="tab-export"):
                self.export = ExportTab(self)
        ex = self.explore
        # everything a mapping edit redraws
        self.label_outputs = self.clusters.outputs + [ex.shown] + ex.render_outputs
        # everything that shows the selected run
        self.run_outputs = ([self.run_dd] + self.discover.status_outputs + self.clusters.outputs
                            + [ex.image_dd, ex.gallery, ex.gallery_ids, ex.page, ex.shown] + ex.render_outputs
                            + [ex.crf, ex.opacity] + self.export.outputs + self.export.form_outputs
                            + [self.discover.form[k] for k in self.discover.form])

    # ---------------------------------------------------------------- views spanning tabs
    def project_choices_update(self, value):
        return gr.update(choices=H.project_choices(projects.list_projects(self.ctx)), value=value)

    def label_views(self, run_id, image_id, op, use_crf, visible, reset_visible: bool = False) -> dict:
        """Everything that shows the cluster -> label mapping of a finished run (and its version)."""
        version = edit_versions.mapping_version(self.ctx, run_id)   # read first: never newer than the views
        self.shown_versions.record(run_id, version)
        clusters = mapping.list_clusters(self.ctx, run_id)
        indices = [c.index for c in clusters]
        if reset_visible or visible is None:
            visible = indices
        else:
            previous = set(visible)
            visible = [i for i in indices if i in previous]
        out = self.clusters.cluster_views(run_id, clusters)
        out[self.clusters.shown_version] = version
        out[self.explore.shown] = gr.update(choices=H.visible_cluster_choices(clusters), value=visible)
        out.update(self.explore.render(run_id, image_id, op, use_crf, visible, indices))
        return out

    def _no_mapping(self, message: str) -> dict:
        out = self.clusters.empty_views(message)
        out[self.explore.shown] = gr.update(choices=[], value=[])
        out.update(self.explore.empty_render())
        out.update(self.explore.empty_gallery_views())
        out.update(self.export.empty_views())
        return out

    def run_views(self, run_id) -> dict:
        if run_id is None:
            out = self.discover.status_views(None)
            out.update(self._no_mapping("No run selected: start one in the Discover tab."))
            return out
        info = runs.get_run(self.ctx, run_id)
        out = self.discover.status_views(info)
        out.update(self.discover.form_views(info.params))
        # No run-list update here: new choices make Gradio re-filter an open list by the text in the
        # box, so a list the person had just opened would shrink to the selected run. The poll
        # relabels the list when the selected run's status changes; Refresh does it on demand.
        if info.status != RunStatus.DONE:
            word = H.STATUS_WORDS.get(info.status, info.status).lower()
            out.update(self._no_mapping(f"Run {info.id} is {word}: its clusters appear here "
                                        "when it has finished."))
            return out
        ex = self.explore
        items = runs.run_images(self.ctx, run_id)
        first = items[0].image_id if items else None
        out.update({ex.image_dd: gr.update(choices=[(it.name, it.image_id) for it in items], value=first),
                    ex.opacity: 0.5,
                    ex.crf: gr.update(value=True)})     # the best maps there are: refined, else CRF, else raw
        out.update(ex.gallery_views(run_id, 1))
        out.update(self.label_views(run_id, first, 0.5, True, None, reset_visible=True))
        out.update(self.export.export_views(run_id))
        return out

    # ---------------------------------------------------------------- header handlers
    @guard
    def on_load(self, request: gr.Request):
        """The project and run in the URL (?project=&run=, kept there by URL_STATE_JS), else the project
        with the latest activity (a second tab opens where the work is)."""
        query = dict(request.query_params) if request is not None else {}
        plist = projects.list_projects(self.ctx)
        wanted = int_or_none(query.get("project"))
        pid = wanted if wanted in [p.id for p in plist] else projects.recent_project(self.ctx)
        out = {self.project_dd: gr.update(choices=H.project_choices(plist), value=pid)}
        run_wanted = int_or_none(query.get("run")) if pid == wanted else None
        out.update(self.project.project_views(pid, keep_run=run_wanted))
        return out

    @guard
    def on_project(self, pid, run_id):
        """Another project: its newest run (the selected run stays when it belongs to it)."""
        return self.project.project_views(H.as_id(pid, "project"), keep_run=H.as_id(run_id, "run"))

    @guard
    def on_refresh(self, pid, run_id):
        pid = H.as_id(pid, "project")
        run_id = H.as_id(run_id, "run")
        out = {self.project_dd: self.project_choices_update(pid)}
        if pid is not None:
            run_list = runs.list_runs(self.ctx, pid)
            ids = [r.id for r in run_list]
            keep = run_id if run_id in ids else (ids[0] if ids else None)
            out[self.run_dd] = gr.update(choices=H.run_choices(run_list), value=keep)
            if keep == run_id:
                out.update(self.run_views(run_id))
        return out

    @guard
    def on_run(self, run_id):
        return self.run_views(H.as_id(run_id, "run"))

    def wire(self, demo: gr.Blocks) -> None:
        demo.load(self.on_load, outputs=[self.project_dd] + self.project.outputs).then(None, js=READY_JS)
        self.project_dd.change(self.on_project, [self.project_dd, self.run_dd], self.project.outputs)
        for dd in (self.project_dd, self.run_dd):          # the address bar remembers the selection
            dd.change(None, [self.project_dd, self.run_dd], None, js=URL_STATE_JS)
        self.run_dd.change(self.on_run, self.run_dd, self.run_outputs)
        self.run_dd.change(lambda run_id: run_id, self.run_dd, self.run_state, show_progress="hidden")
        self.refresh_btn.click(self.on_refresh, [self.project_dd, self.run_dd], [self.project_dd] + self.run_outputs)
        for tab in (self.project, self.discover, self.clusters, self.explore, self.export):
            tab.wire()


def build_ui(ctx) -> gr.Blocks:
    """The whole app as a gr.Blocks bound to `ctx` (an AppContext)."""
    with gr.Blocks(title="STEGO class discovery", css=CSS + NAMING_CSS, analytics_enabled=False,
                   theme=_theme(), js=RECONNECT_JS) as demo:
        App(ctx).wire(demo)
    # what the open tabs' ping compares to see a restart: fresh per process (Gradio draws it from
    # `random`, which a seeded run could make repeat) and exact in JavaScript (below 2**53)
    demo.app_id = secrets.randbits(52)
    return demo
