"""Tab 1 · Project: create projects and add images (uploads, zips, a server folder)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import gradio as gr

from stego_app import ingest, projects, removal, runs, thumbnails
from stego_app.errors import UserError
from stego_app.ingest import FileProblem, IngestReport
from stego_app.ui import formatting as H
from stego_app.ui.common import GALLERY_PAGE, THUMB_SIZE, guard, page_views, progress_cb


class ProjectTab:
    """The Project tab's components (built in the current gr.Tab) and handlers."""

    def __init__(self, app):
        self.app, self.ctx = app, app.ctx
        roots = [str(p) for p in self.ctx.config.allowed_roots]
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### New project")
                self.new_name = gr.Textbox(label="Name", elem_id="new-project-name",
                                           placeholder="e.g. Street scenes, March")
                self.new_desc = gr.Textbox(label="Description (optional)", elem_id="new-project-desc")
                self.create_btn = gr.Button("Create project", elem_id="btn-create-project")
                self.project_md = gr.Markdown(elem_id="project-info")
            with gr.Column(scale=2):
                gr.Markdown("### Add images to the selected project")
                self.upload = gr.File(label="Images or .zip archives (drop files here)",
                                      file_count="multiple", type="filepath", elem_id="upload-files",
                                      height=150)
                self.upload_btn = gr.Button("Add uploaded files", variant="primary",
                                            elem_id="btn-ingest-upload")
                with gr.Row(equal_height=True):
                    self.folder = gr.Textbox(
                        label="…or a folder on the server", elem_id="server-folder", scale=3,
                        placeholder=roots[0] if roots else "no folders allowed on this server",
                        info=("Allowed: " + ", ".join(roots)) if roots else
                        "The administrator can allow folders with --allowed-root.")
                    self.folder_btn = gr.Button("Add folder", elem_id="btn-ingest-folder", scale=1)
        self.ingest_md = gr.Markdown(elem_id="ingest-summary")
        self.problems_df = gr.Dataframe(headers=["File", "Problem", "Reason"], value=[],
                                        label="Files that were not added", interactive=False,
                                        elem_id="ingest-problems", wrap=True, visible=False,
                                        column_widths=["34%", "11%", "55%"])   # "duplicate" on one line
        self.gallery = gr.Gallery(label="Images in this project", columns=10, height=260,
                                  allow_preview=True, elem_id="project-images",
                                  object_fit="cover", show_download_button=False)
        self.page = gr.Slider(label="Page", minimum=1, maximum=1, step=1, value=1,
                              visible=False, elem_id="project-page")
        with gr.Row(equal_height=True):
            self.remove_sel = gr.Dropdown(label="Images to remove (click them in the gallery)", choices=[],
                                          multiselect=True, value=[], elem_id="remove-select", scale=4,
                                          allow_custom_value=True,   # ids stay valid across a restart
                                          info="Runs that used them keep showing them.")
            self.remove_btn = gr.Button("Remove from the project", variant="stop", elem_id="btn-remove", scale=1)
        with gr.Row(visible=False, elem_id="remove-confirm") as self.remove_row:   # asked before deleting
            self.remove_md = gr.Markdown(elem_id="remove-question")
            self.remove_yes = gr.Button("Yes, remove them", variant="stop", elem_id="btn-remove-yes", scale=0)
            self.remove_no = gr.Button("Keep them", elem_id="btn-remove-no", scale=0)
        self.ids = gr.State([])              # image ids in the order the gallery shows them

    @property
    def outputs(self) -> list:
        """What project_views updates (with the header's run dropdown)."""
        return [self.app.run_dd, self.project_md, self.gallery, self.page, self.ids, self.remove_sel]

    # ---------------------------------------------------------------- views
    def gallery_views(self, pid, page) -> dict:
        shown = thumbnails.project_gallery(self.ctx, pid, page, GALLERY_PAGE, THUMB_SIZE)
        out = page_views(self.gallery, self.page, shown)
        out[self.ids] = [info.id for info, _ in shown.items]
        out[self.remove_sel] = gr.update(choices=[(info.name, info.id) for info, _ in shown.items], value=[])
        return out

    def project_views(self, pid, page=1, keep_run=None) -> dict:
        run_dd = self.app.run_dd
        if pid is None:
            return {run_dd: gr.update(choices=[], value=None),
                    self.project_md: "No project yet: create one on the left.",
                    self.gallery: [], self.page: gr.update(value=1, maximum=1, visible=False)}
        p = projects.get_project(self.ctx, pid)
        images = ingest.list_images(self.ctx, pid)
        run_list = runs.list_runs(self.ctx, pid)
        md = f"**{H.esc(p.name)}**" + (f": {H.esc(p.description)}" if p.description else "")
        md += "\n\n" + H.images_summary(images)
        ids = [r.id for r in run_list]
        out = {run_dd: gr.update(choices=H.run_choices(run_list),
                                 value=keep_run if keep_run in ids else (ids[0] if ids else None)),
               self.project_md: md}
        out.update(self.gallery_views(pid, page))
        return out

    def ingest_result(self, pid, reports, extra) -> dict:
        merged = IngestReport.merge(reports)
        n = len(merged.added)
        if n:
            fixed = f" ({len(merged.repaired)} replacing an unreadable copy)" if merged.repaired else ""
            gr.Info(f"{n} image{'s' if n != 1 else ''} added{fixed}.")
        elif merged.rejected or merged.duplicates:
            gr.Warning("No image was added; see the list of problems.")
        out = {self.app.project_dd: self.app.project_choices_update(pid),
               self.ingest_md: H.ingest_summary(merged),
               self.problems_df: gr.update(value=(rows := H.ingest_problem_rows(merged)), visible=bool(rows)),
               **extra}
        views = self.project_views(pid)
        views.pop(self.app.run_dd)     # keep the selected run
        out.update(views)
        return out

    # ---------------------------------------------------------------- handlers
    @guard
    def on_create(self, name, desc):
        p = projects.create_project(self.ctx, name, desc or "")
        gr.Info(f"Project '{p.name}' created. Now add images.")
        return {self.app.project_dd: self.app.project_choices_update(p.id), self.new_name: "",
                self.new_desc: ""}

    @guard
    def on_ingest_upload(self, pid, files, progress=gr.Progress()):
        pid = H.as_id(pid, "project")
        if pid is None:
            raise UserError("create or choose a project first")
        if not files:
            raise UserError("drop some image files or .zip archives into the upload box first")
        reports = []
        archives = [Path(f) for f in files if zipfile.is_zipfile(f)]
        plain = [Path(f) for f in files if Path(f) not in archives]
        cb = progress_cb(progress, "Checking images")
        if plain:
            reports.append(ingest.ingest_files(self.ctx, pid, plain, [p.name for p in plain], progress=cb))
        for z in archives:
            try:
                reports.append(ingest.ingest_zip(self.ctx, pid, z, progress=cb).within(z.name))
            except UserError as exc:   # one bad archive does not hide the other files' reports
                reports.append(IngestReport(rejected=[FileProblem(name=z.name, reason=str(exc))]))
        return self.ingest_result(pid, reports, {self.upload: None})

    @guard
    def on_ingest_folder(self, pid, path, progress=gr.Progress()):
        pid = H.as_id(pid, "project")
        if pid is None:
            raise UserError("create or choose a project first")
        if not (path or "").strip():
            raise UserError("type the path of a folder on the server")
        report = ingest.ingest_folder(self.ctx, pid, path.strip(),
                                      progress=progress_cb(progress, "Checking images"))
        return self.ingest_result(pid, [report], {})

    @guard
    def on_page(self, pid, page):
        pid = H.as_id(pid, "project")
        if pid is None:
            return gr.skip()
        return self.gallery_views(pid, page)

    @staticmethod
    def _removal(pid, selected) -> tuple[int, list[int]]:
        pid = H.as_id(pid, "project")
        if pid is None:
            raise UserError("choose a project first")
        if not selected:
            raise UserError("click the images to remove in the gallery first")
        return pid, [int(i) for i in selected]

    @guard
    def on_remove_ask(self, pid, selected):
        """Removing deletes files: say what will happen and wait for a yes."""
        n = len(self._removal(pid, selected)[1])
        return {self.remove_row: gr.update(visible=True),
                self.remove_md: f"Remove **{H.count(n, 'image')}** from the project? Their files are deleted "
                                "unless a run used them (runs keep showing those, marked stale). "
                                "This cannot be undone."}

    @guard
    def on_remove(self, pid, selected):
        pid, ids = self._removal(pid, selected)
        report = removal.remove_images(self.ctx, pid, ids)
        text = report.summary()
        gr.Info(text[:1].upper() + text[1:] + ".")
        out = {self.app.project_dd: self.app.project_choices_update(pid), self.remove_row: gr.update(visible=False)}
        views = self.project_views(pid)
        views.pop(self.app.run_dd)     # keep the selected run
        out.update(views)
        return out

    @guard
    def on_gallery_select(self, ids, chosen, evt: gr.SelectData):
        if evt is None or evt.index is None or not ids:
            return gr.skip()
        i = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not 0 <= i < len(ids):
            return gr.skip()
        chosen = list(chosen or [])
        return gr.update(value=chosen if ids[i] in chosen else chosen + [ids[i]])

    def wire(self) -> None:
        project_dd = self.app.project_dd
        self.page.input(self.on_page, [project_dd, self.page], [self.gallery, self.page, self.ids, self.remove_sel],
                        trigger_mode="always_last")
        self.gallery.select(self.on_gallery_select, [self.ids, self.remove_sel], [self.remove_sel])
        self.remove_btn.click(self.on_remove_ask, [project_dd, self.remove_sel], [self.remove_row, self.remove_md])
        self.remove_yes.click(self.on_remove, [project_dd, self.remove_sel],
                              [project_dd, self.remove_row] + self.outputs[1:])
        self.remove_no.click(lambda: gr.update(visible=False), None, [self.remove_row])
        self.create_btn.click(self.on_create, [self.new_name, self.new_desc],
                              [project_dd, self.new_name, self.new_desc])
        ingest_outputs = [project_dd, self.ingest_md, self.problems_df, self.project_md, self.gallery,
                          self.page, self.upload, self.ids, self.remove_sel]
        self.upload_btn.click(self.on_ingest_upload, [project_dd, self.upload], ingest_outputs)
        self.folder_btn.click(self.on_ingest_folder, [project_dd, self.folder], ingest_outputs)
