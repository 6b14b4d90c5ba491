"""Tab 4 · Explore: one image with its coloured segmentation; check images as seed annotations."""
from __future__ import annotations

import gradio as gr

from stego_app import refinement, runs, thumbnails
from stego_app.errors import UserError
from stego_app.labels import annotations, mapping, views
from stego_app.labels.views import DISPLAY_MAX_SIDE
from stego_app.models import RunStatus
from stego_app.ui import formatting as H
from stego_app.ui.common import GALLERY_PAGE, THUMB_SIZE, guard, page_views
from stego_app.ui.naming import FindPanel


VIEW_QUEUE = "explore-view"    # the Gradio concurrency group of everything that draws or changes the shown image


class ExploreTab:
    """The Explore tab's components (built in the current gr.Tab) and handlers."""

    def __init__(self, app, tab):
        self.app, self.ctx, self.tab = app, app.ctx, tab
        self.gallery = gr.Gallery(label="Click an image", columns=10, height=200,
                                  allow_preview=False, elem_id="explore-gallery",
                                  object_fit="cover", show_download_button=False)
        self.page = gr.Slider(label="Page", minimum=1, maximum=1, step=1, value=1,
                              visible=False, elem_id="explore-page")
        with gr.Row(equal_height=True):
            self.image_dd = gr.Dropdown(label="Image", choices=[], allow_custom_value=True,
                                        elem_id="explore-image", scale=2)
            self.opacity = gr.Slider(label="Overlay opacity", minimum=0, maximum=1, step=0.05,
                                     value=0.5, elem_id="opacity", scale=2)
            self.crf = gr.Checkbox(label="Refined (CRF, names)", value=True, elem_id="explore-crf", scale=1,
                                   info="refined with names when ready, else the CRF maps; unticked: the raw clusters")
            self.confirm_cb = gr.Checkbox(label="Checked: use as seed annotation", value=False,
                                          elem_id="explore-confirm", scale=1)
        self.shown = gr.CheckboxGroup(label="Show clusters", choices=[], elem_id="explore-visible")
        with gr.Row():
            self.original_img = gr.Image(label="Original", interactive=False, elem_id="explore-original",
                                         show_download_button=False, height=420)
            self.overlay_img = gr.Image(label="Segmentation", interactive=False, elem_id="explore-overlay",
                                        show_download_button=False, height=420)
        self.legend = gr.HTML(H.legend_html([], "explore-legend-inner"), elem_id="explore-legend")
        with gr.Row(equal_height=True):
            self.corr_note = gr.HTML("", elem_id="explore-corrections")
            self.forget_btn = gr.Button("Forget this image's corrections", visible=False, size="sm", scale=0,
                                        elem_id="btn-forget-corrections")
        with gr.Row(visible=False, elem_id="forget-confirm") as self.forget_row:   # asked before deleting
            self.forget_md = gr.Markdown(elem_id="forget-question")
            self.forget_yes = gr.Button("Yes, forget them", variant="stop", elem_id="btn-forget-yes", scale=0)
            self.forget_no = gr.Button("Keep them", elem_id="btn-forget-no", scale=0)
        self.finder = FindPanel.build(self.ctx)
        self.gallery_ids = gr.State([])      # image ids in the order the gallery shows them

    @property
    def inputs(self) -> list:
        """The view settings every mapping edit re-renders with."""
        return [self.image_dd, self.opacity, self.crf, self.shown]

    @property
    def render_outputs(self) -> list:
        return [self.original_img, self.overlay_img, self.legend, self.confirm_cb] + self.correction_outputs

    @property
    def restyle_outputs(self) -> list:
        """What a change of opacity, maps or shown clusters redraws. Not the "Checked" box: the image is
        the same, and a redraw still on its way must not undo a tick made meanwhile."""
        return [self.overlay_img, self.legend]

    @property
    def correction_outputs(self) -> list:
        return [self.corr_note, self.forget_btn, self.forget_row]

    # ---------------------------------------------------------------- views
    def gallery_views(self, run_id, page) -> dict:
        shown_page = thumbnails.run_gallery(self.ctx, run_id, page, GALLERY_PAGE, THUMB_SIZE)
        out = page_views(self.gallery, self.page, shown_page)
        out[self.gallery_ids] = [info.id for info, _ in shown_page.items]
        return out

    def empty_gallery_views(self) -> dict:
        return {self.image_dd: gr.update(choices=[], value=None), self.gallery: [],
                self.gallery_ids: [], self.page: gr.update(value=1, maximum=1, visible=False)}

    def render(self, run_id, image_id, op, use_crf, visible, all_indices) -> dict:
        if run_id is None or image_id is None:
            return self.empty_render()
        hidden = H.hidden_clusters(all_indices, visible)
        view = views.render_segmentation(self.ctx, run_id, int(image_id), crf=bool(use_crf),
                                         opacity=float(op if op is not None else 0.5), hidden=hidden,
                                         max_side=DISPLAY_MAX_SIDE, refined=bool(use_crf))
        maps = "refined with names" if view.refined else ("CRF-refined" if view.crf else "raw clusters")
        return {self.original_img: view.original, self.overlay_img: view.overlay,
                self.legend: f'<div class="stego-muted" id="explore-maps" data-maps="{H.esc(maps)}">'
                             f'Showing: {H.esc(maps)}</div>' + H.legend_html(view.legend, "explore-legend-inner"),
                self.confirm_cb: gr.update(value=bool(view.confirmed), interactive=True),
                **self.correction_views(run_id, int(image_id))}

    def correction_views(self, run_id: int, image_id: int) -> dict:
        """Whether this image carries corrections imported from an annotation tool, and their state."""
        found = refinement.image_corrections(self.ctx, run_id, image_id)
        note = (f'<div class="stego-muted" id="explore-corrections-text" data-in-maps="{int(found[0].in_maps)}">'
                f'{H.esc(found[0].text)}</div>' if found else "")
        return {self.corr_note: note, self.forget_btn: gr.update(visible=bool(found)),
                self.forget_row: gr.update(visible=False)}

    def empty_render(self) -> dict:
        return {self.original_img: None, self.overlay_img: None,
                self.legend: H.legend_html([], "explore-legend-inner"),
                self.confirm_cb: gr.update(value=False, interactive=False),
                self.corr_note: "", self.forget_btn: gr.update(visible=False), self.forget_row: gr.update(visible=False)}

    # ---------------------------------------------------------------- handlers
    @guard
    def on_render(self, run_id, image_id, op, use_crf, visible):
        run_id = H.as_id(run_id, "run")
        image_id = H.as_id(image_id, "image")
        if run_id is None or image_id is None:
            return self.render(None, None, op, use_crf, visible, [])
        info = runs.get_run(self.ctx, run_id)
        if info.status != RunStatus.DONE:
            return self.render(None, None, op, use_crf, visible, [])
        indices = [c.index for c in mapping.list_clusters(self.ctx, run_id)]
        return self.render(run_id, image_id, op, use_crf, visible, indices)

    @guard
    def on_restyle(self, run_id, image_id, op, use_crf, visible):
        views_ = self.on_render(run_id, image_id, op, use_crf, visible)
        if not isinstance(views_, dict):
            return views_
        return {c: views_[c] for c in self.restyle_outputs}

    @guard
    def on_page(self, run_id, page):
        run_id = H.as_id(run_id, "run")
        if run_id is None:
            return gr.skip()
        return self.gallery_views(run_id, page)

    @guard
    def on_gallery_select(self, ids, evt: gr.SelectData):
        if evt is None or evt.index is None or not ids:
            return gr.skip()
        i = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not 0 <= i < len(ids):
            return gr.skip()
        return gr.update(value=ids[i])

    @staticmethod
    def _chosen(run_id, image_id) -> tuple[int, int]:
        run_id = H.as_id(run_id, "run")
        image_id = H.as_id(image_id, "image")
        if run_id is None or image_id is None:
            raise UserError("choose an image first")
        return run_id, int(image_id)

    @guard
    def on_confirm(self, run_id, image_id, checked):
        run_id, image_id = self._chosen(run_id, image_id)
        annotations.confirm_image(self.ctx, run_id, image_id, bool(checked))
        n = annotations.confirmed_count(self.ctx, run_id)
        gr.Info(f"{'Checked' if checked else 'Unchecked'}; {n} image{'s' if n != 1 else ''} checked in this run.")
        # the box shows what is stored, whatever a drawing that landed meanwhile set it to
        return {self.confirm_cb: gr.update(value=bool(checked)), **self.correction_views(run_id, image_id)}

    @guard
    def on_forget_ask(self, run_id, image_id):
        """Forgetting deletes what came from an annotation tool: say what, and wait for a yes."""
        run_id, image_id = self._chosen(run_id, image_id)
        found = refinement.image_corrections(self.ctx, run_id, image_id)
        if not found:
            raise UserError("this image has no imported corrections")
        c = found[0]
        return {self.forget_row: gr.update(visible=True),
                self.forget_md: f"Forget this image's corrections (**{H.esc(', '.join(c.labels))}**, from "
                                f"{H.esc(c.source)})? The image stays checked; importing the file again brings "
                                "them back."}

    @guard
    def on_forget(self, run_id, image_id):
        run_id, image_id = self._chosen(run_id, image_id)
        gr.Info(refinement.forget_corrections(self.ctx, run_id, image_id))
        return self.correction_views(run_id, image_id)

    def wire(self) -> None:
        run_dd = self.app.run_dd
        # what draws or changes the shown image runs one at a time, in the order it was asked for: a
        # slow drawing of the previous image cannot land over the next one, and a tick of "Checked"
        # is stored after (so shown over) any drawing asked for before it
        one_view = dict(concurrency_id=VIEW_QUEUE, concurrency_limit=1)
        self.page.input(self.on_page, [run_dd, self.page], [self.gallery, self.gallery_ids, self.page],
                        trigger_mode="always_last")
        self.image_dd.change(self.on_render, [run_dd] + self.inputs, self.render_outputs, **one_view)
        for control in (self.opacity, self.crf, self.shown):    # while dragging, only the last value renders
            control.input(self.on_restyle, [run_dd] + self.inputs, self.restyle_outputs,
                          trigger_mode="always_last", show_progress="hidden", **one_view)
        # the last thumbnail clicked wins (Gradio's default "once" drops a click made while the
        # previous one is still on its way, leaving the gallery and the image shown out of step)
        self.gallery.select(self.on_gallery_select, [self.gallery_ids], [self.image_dd], trigger_mode="always_last")
        self.confirm_cb.input(self.on_confirm, [run_dd, self.image_dd, self.confirm_cb],
                              [self.confirm_cb] + self.correction_outputs, trigger_mode="multiple", **one_view)
        self.forget_btn.click(self.on_forget_ask, [run_dd, self.image_dd], [self.forget_row, self.forget_md])
        self.forget_yes.click(self.on_forget, [run_dd, self.image_dd], self.correction_outputs, **one_view)
        self.forget_no.click(lambda: gr.update(visible=False), None, [self.forget_row])
        # opening the tab draws the image again: maps refined since it was drawn show up at once
        self.tab.select(self.on_render, [run_dd] + self.inputs, self.render_outputs, show_progress="hidden",
                        **one_view)
        self.finder.wire(guard, run_dd, self.image_dd, [self.original_img, self.overlay_img], self.inputs,
                         self.app.label_outputs, self.app.label_views, DISPLAY_MAX_SIDE)
