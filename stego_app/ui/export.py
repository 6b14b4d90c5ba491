"""Tab 5 · Export: COCO export of the selected run and the download of the latest one."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import gradio as gr

from stego_app import downloads
from stego_app import export as export_svc
from stego_app.errors import UserError
from stego_app.ui import formatting as H
from stego_app.ui.common import guard, progress_cb


_EXTRA = ("include_images", "label_studio", "ls_regions", "ls_image_prefix", "tolerance", "stuff_iscrowd",
          "to_correct", "removed_images")


_STYLE_CHOICE = {"masks": "stuff", "polygons": "instance"}   # ExportOptions.style -> the radio's value


def _dataclass_from(cls, values: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


class ExportTab:
    """The Export tab's components (built in the current gr.Tab) and handlers."""

    def __init__(self, app):
        self.app, self.ctx = app, app.ctx
        self.defaults = d = export_svc.ExportOptions()
        gr.Markdown("COCO export of the named clusters of the selected run (unnamed and ignored "
                    "clusters are left out unless you include them).")
        with gr.Row():
            self.style = gr.Radio(label="Annotation style",
                                  choices=[("masks: pixel-exact RLE (things: one per object, stuff: one per image)", "stuff"),
                                           ("polygons: editable outlines, simplified", "instance")],
                                  value=_STYLE_CHOICE[d.style], elem_id="export-style")
            self.min_area = gr.Number(label="Smallest object kept (px, thing labels)",
                                      value=d.min_area, precision=0, minimum=0, elem_id="export-min-area")
        with gr.Row():
            self.crf = gr.Checkbox(label="Use CRF-refined segments (when the run made them)", value=d.crf,
                                   elem_id="export-crf")
            self.confirmed = gr.Checkbox(label="Only images checked in Explore", value=d.confirmed_only,
                                         elem_id="export-confirmed")
            self.unnamed = gr.Checkbox(label="Include unnamed clusters",
                                       value=getattr(d, "include_unnamed", False), elem_id="export-unnamed")
            self.panoptic = gr.Checkbox(label="Also COCO panoptic", value=d.panoptic, elem_id="export-panoptic")
            self.pngs = gr.Checkbox(label="Also label PNGs", value=d.label_pngs, elem_id="export-pngs")
            self.refined = gr.Checkbox(label="Use maps refined with names (when ready)",
                                       value=d.refined, elem_id="export-refined")
        # the newer options, built from ExportOptions' own labels and help texts
        self.extra: dict[str, Any] = {}
        with gr.Accordion("More formats and options (images, Label Studio, polygons, iscrowd, "
                          "images to correct first)", open=False, elem_id="export-more"):
            for name, default, meta in export_svc.option_fields():
                if name not in _EXTRA:
                    continue
                kw = dict(label=meta["label"], info=meta["help"], value=default, elem_id=f"export-{name}")
                if isinstance(default, bool):
                    self.extra[name] = gr.Checkbox(**kw)
                elif meta.get("choices"):
                    self.extra[name] = gr.Radio(choices=list(meta["choices"]), **kw)
                elif isinstance(default, (int, float)):
                    self.extra[name] = gr.Number(minimum=0, precision=0 if isinstance(default, int) else None, **kw)
                else:
                    self.extra[name] = gr.Textbox(**kw)
        self.export_btn = gr.Button("Export COCO", variant="primary", elem_id="btn-export")
        self.summary_md = gr.Markdown(elem_id="export-summary")
        self.download_btn = gr.DownloadButton("Download export (.zip)", visible=False, elem_id="btn-download")

    @property
    def outputs(self) -> list:
        return [self.summary_md, self.download_btn]

    @property
    def form_outputs(self) -> list:
        return [self.style, self.min_area, self.crf, self.confirmed, self.unnamed, self.panoptic, self.pngs,
                self.refined, *self.extra.values()]

    def form_views(self, options: export_svc.ExportOptions) -> dict:
        """The form set to `options` (a run's latest export: exporting again after more naming is one click),
        except a batch of images to correct: that is a one-off, and the form goes back to every image."""
        values = [_STYLE_CHOICE[options.style], options.min_area, options.crf, options.confirmed_only,
                  options.include_unnamed, options.panoptic, options.label_pngs, options.refined,
                  *(0 if name == "to_correct" else getattr(options, name) for name in self.extra)]
        return dict(zip(self.form_outputs, values))

    def export_views(self, run_id) -> dict:
        """The run's latest export to download, and the form set to the options it was made with (a run
        never exported leaves the form as the person set it)."""
        exports = export_svc.list_exports(self.ctx, run_id)
        out = self.form_views(exports[0].options) if exports else {}
        done = [e for e in exports if e.status == "done" and e.zip_path and Path(e.zip_path).is_file()]
        if not done:
            return {**out, self.summary_md: "No export of this run yet.", self.download_btn: gr.update(visible=False)}
        return {**out, **self._show(done[0])}

    def empty_views(self) -> dict:
        return {self.summary_md: "", self.download_btn: gr.update(visible=False)}

    def _show(self, info) -> dict:
        return {self.summary_md: H.export_summary(info),
                self.download_btn: gr.update(value=str(downloads.offer(self.ctx.config, info.zip_path)),
                                             visible=True,
                                             label=f"Download {Path(info.zip_path).name}")}

    @guard
    def on_export(self, run_id, style, min_area, use_crf, confirmed_only, unnamed, panoptic, pngs, use_refined,
                  *extra, progress=gr.Progress()):
        run_id = H.as_id(run_id, "run")
        if run_id is None:
            raise UserError("no run selected")
        wanted = dict(style=style, crf=bool(use_crf), confirmed_only=bool(confirmed_only),
                      min_area=int(min_area if min_area is not None else self.defaults.min_area),
                      panoptic=bool(panoptic), label_pngs=bool(pngs), include_unnamed=bool(unnamed),
                      refined=bool(use_refined))
        for name, value in zip(self.extra, extra):
            if name == "stuff_iscrowd":
                value = int(value)
            elif name == "to_correct":
                value = int(value or 0)
            wanted[name] = value
        options = _dataclass_from(export_svc.ExportOptions, wanted)
        info = export_svc.export_run(self.ctx, run_id, options, progress=progress_cb(progress, "Exporting"))
        if info.status != "done" or not info.zip_path:
            raise UserError(f"the export failed: {info.error or 'no zip was written'}")
        gr.Info(f"Export {info.id} ready: {info.n_annotations} annotations.")
        return self._show(info)

    def wire(self) -> None:
        self.export_btn.click(self.on_export, [self.app.run_dd, self.style, self.min_area, self.crf,
                                               self.confirmed, self.unnamed, self.panoptic, self.pngs,
                                               self.refined, *self.extra.values()],
                              self.outputs)
