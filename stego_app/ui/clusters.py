"""Tab 3 · Clusters: a card per cluster; name, merge, unmerge, ignore and recolour them."""
from __future__ import annotations

import logging
from typing import Callable

import gradio as gr

from stego_app import corrections, edit_versions, label_kinds
from stego_app.errors import UserError
from stego_app.labels import mapping, views
from stego_app.ui import formatting as H
from stego_app.ui.common import ERROR_TOAST_S, guard
from stego_app.ui.naming import NamingPanel, RefinePanel

log = logging.getLogger(__name__)

N_EXAMPLES = 4              # example thumbnails per cluster card
EXAMPLE_SIZE = 160


def colour_hex(value: str | None) -> str:
    """gr.ColorPicker gives '#rrggbb' or sometimes 'rgba(r, g, b, a)'."""
    v = (value or "").strip()
    if v.startswith("rgb"):
        nums = [float(x) for x in v[v.index("(") + 1: v.index(")")].split(",")[:3]]
        return "#" + "".join(f"{int(round(n)):02x}" for n in nums)
    return v


def _need_selection(run_id, selected) -> list[int]:
    if run_id is None:
        raise UserError("no run selected")
    if not selected:
        raise UserError("select one or more clusters first (tick them under the cards)")
    return [int(i) for i in selected]


class ClustersTab:
    """The Clusters tab's components (built in the current gr.Tab) and handlers."""

    def __init__(self, app):
        self.app, self.ctx = app, app.ctx
        gr.Markdown("Each card is a discovered cluster: its colour, its share of all pixels and the "
                    "images where it is most confident (the cluster tinted). Select clusters below, "
                    "then name them (one), merge them under one name (several), undo a merge or "
                    "ignore them. Similar clusters are boxed together as groups: name a whole group at "
                    "once, or type a name for the cluster shown below and press Enter.")
        self.naming = NamingPanel.build(self.ctx)
        self.cards_html = gr.HTML(H.cluster_cards_html([], lambda c, i: None), elem_id="clusters-html")
        self.cluster_sel = gr.CheckboxGroup(label="Selected clusters", choices=[], elem_id="cluster-select")
        with gr.Row(equal_height=True):
            self.label_name = gr.Textbox(label="Label name", elem_id="label-name", scale=2,
                                         placeholder="e.g. sky; an existing name merges into it")
            self.name_btn = gr.Button("Name / merge selected", variant="primary", elem_id="btn-name")
            self.unmerge_btn = gr.Button("Undo merge / unname", elem_id="btn-unmerge")
            self.ignore_btn = gr.Button("Ignore", elem_id="btn-ignore")
            self.unignore_btn = gr.Button("Stop ignoring", elem_id="btn-unignore")
        with gr.Row(visible=False, elem_id="unname-confirm") as self.unname_row:
            self.unname_md = gr.Markdown(elem_id="unname-question")
            self.unname_yes = gr.Button("Remove the name", variant="stop", elem_id="btn-unname-yes")
            self.unname_no = gr.Button("Keep it", elem_id="btn-unname-no")
        with gr.Row(equal_height=True):
            self.colour_label = gr.Dropdown(label="Label to recolour", choices=[], allow_custom_value=True,
                                            elem_id="colour-label")
            self.colour_pick = gr.ColorPicker(label="Colour", value="#1f77b4", elem_id="colour-picker")
            self.colour_btn = gr.Button("Set colour", elem_id="btn-colour")
            self.kind_pick = gr.Radio(label="Thing or stuff (exports)", choices=[
                ("guess from the name", "auto"), ("thing: one object per region", "thing"),
                ("stuff: one region per image", "stuff")], value="auto", elem_id="kind-pick")
            self.kind_btn = gr.Button("Set kind", elem_id="btn-kind")
        self.kinds_md = gr.Markdown(elem_id="label-kinds")
        self.legend_html = gr.HTML(H.legend_html([], "clusters-legend-inner"), elem_id="clusters-legend")
        self.shown_version = gr.State(None)   # the mapping version these views show (edits carry it)
        self.refine = RefinePanel.build(self.ctx)

    @property
    def outputs(self) -> list:
        return ([self.cards_html, self.cluster_sel, self.colour_label, self.legend_html, self.kinds_md,
                 self.shown_version,
                 self.unname_row] + self.naming.outputs + self.refine.outputs)

    # ---------------------------------------------------------------- views
    def example_urls(self, run_id: int, clusters) -> dict[tuple[int, int], str]:
        urls: dict[tuple[int, int], str] = {}
        try:
            thumbs = views.examples_of_clusters(self.ctx, run_id, [c.index for c in clusters], n=N_EXAMPLES,
                                                size=EXAMPLE_SIZE)
        except UserError as exc:
            log.warning("no examples for the clusters of run %s: %s", run_id, exc)
            return urls
        for index, items in thumbs.items():
            for image_id, arr in items:
                urls[(index, image_id)] = H.image_data_uri(arr)
        return urls

    def cluster_views(self, run_id, clusters) -> dict:
        urls = self.example_urls(run_id, clusters)
        return {self.cards_html: self.naming.cards_html(run_id, clusters, lambda c, i: urls.get((c.index, i)),
                                                        N_EXAMPLES),
                self.cluster_sel: gr.update(choices=H.cluster_choices(clusters), value=[]),
                self.colour_label: gr.update(choices=H.label_names(clusters), value=None),
                self.legend_html: H.legend_html(mapping.legend(self.ctx, run_id), "clusters-legend-inner"),
                self.kinds_md: H.kinds_text(label_kinds.label_kinds(self.ctx, run_id)),
                self.unname_row: gr.update(visible=False),
                **self.naming.views(run_id, clusters), **self.refine.views(run_id)}

    def empty_views(self, message: str) -> dict:
        return {self.cards_html: f'<div class="stego-cards" id="cluster-cards"><p>{H.esc(message)}</p></div>',
                self.cluster_sel: gr.update(choices=[], value=[]),
                self.colour_label: gr.update(choices=[], value=None),
                self.legend_html: H.legend_html([], "clusters-legend-inner"), self.kinds_md: "",
                self.shown_version: None, self.unname_row: gr.update(visible=False),
                **self.naming.empty(), **self.refine.empty()}

    # ---------------------------------------------------------------- handlers
    def edit(self, run_id, version, image_id, op, use_crf, visible, action: Callable[[], str]) -> dict:
        """One mapping edit made on `version`: a toast on success; on a stale page, the current state."""
        try:
            with edit_versions.expect_version(version):
                message = action()
        except edit_versions.StaleMapping as exc:
            gr.Warning(str(exc), duration=ERROR_TOAST_S, title="Not saved")
            return self.app.label_views(run_id, image_id, op, use_crf, visible)
        gr.Info(message)
        return self.app.label_views(run_id, image_id, op, use_crf, visible)

    @guard
    def on_name(self, run_id, version, selected, name, image_id, op, use_crf, visible):
        run_id = H.as_id(run_id, "run")
        image_id = H.as_id(image_id, "image")
        idx = _need_selection(run_id, selected)
        clean = " ".join((name or "").split())

        def action() -> str:
            note = mapping.naming_note(mapping.list_clusters(self.ctx, run_id), idx, clean)
            note = f" {note}" if note else ""
            if len(idx) == 1:
                mapping.name_cluster(self.ctx, run_id, idx[0], name)
                return f"Cluster #{idx[0]} is now '{clean}'.{note}"
            mapping.merge_clusters(self.ctx, run_id, idx, name)
            return f"Clusters {', '.join(f'#{i}' for i in idx)} merged into '{clean}'.{note}"
        out = self.edit(run_id, version, image_id, op, use_crf, visible, action)
        out[self.label_name] = ""
        return out

    def _unmerge(self, run_id, version, idx, image_id, op, use_crf, visible) -> dict:
        def action() -> str:
            for i in idx:
                mapping.unmerge_cluster(self.ctx, run_id, i)
            return (f"Cluster{'s' if len(idx) != 1 else ''} {', '.join(f'#{i}' for i in idx)} "
                    f"{'are' if len(idx) != 1 else 'is'} unnamed again.")
        return self.edit(run_id, version, image_id, op, use_crf, visible, action)

    @guard
    def on_unmerge(self, run_id, version, selected, image_id, op, use_crf, visible):
        """Taking a cluster out of a merge is harmless; deleting the only use of a name asks first."""
        run_id = H.as_id(run_id, "run")
        image_id = H.as_id(image_id, "image")
        idx = _need_selection(run_id, selected)
        by_index = {c.index: c for c in mapping.list_clusters(self.ctx, run_id)}
        lost = sorted({by_index[i].label_name for i in idx if i in by_index and by_index[i].label_name
                       and not set(by_index[i].merged_with) - set(idx)})
        if lost:
            return {self.unname_row: gr.update(visible=True),
                    self.unname_md: H.unname_question(lost, corrections.corrected_label_names(self.ctx, run_id))}
        return self._unmerge(run_id, version, idx, image_id, op, use_crf, visible)

    @guard
    def on_unname_confirmed(self, run_id, version, selected, image_id, op, use_crf, visible):
        run_id = H.as_id(run_id, "run")
        image_id = H.as_id(image_id, "image")
        return self._unmerge(run_id, version, _need_selection(run_id, selected), image_id, op, use_crf, visible)

    @guard
    def on_ignore(self, run_id, version, selected, image_id, op, use_crf, visible):
        return self._set_ignored(True, run_id, version, selected, image_id, op, use_crf, visible)

    @guard
    def on_unignore(self, run_id, version, selected, image_id, op, use_crf, visible):
        return self._set_ignored(False, run_id, version, selected, image_id, op, use_crf, visible)

    def _set_ignored(self, flag, run_id, version, selected, image_id, op, use_crf, visible):
        run_id = H.as_id(run_id, "run")
        image_id = H.as_id(image_id, "image")
        idx = _need_selection(run_id, selected)

        def action() -> str:
            for i in idx:
                mapping.ignore_cluster(self.ctx, run_id, i, flag)
            which = f"Cluster{'s' if len(idx) != 1 else ''} {', '.join(f'#{i}' for i in idx)}"
            return f"{which} ignored: left out of exports." if flag else f"{which} no longer ignored (unnamed)."
        return self.edit(run_id, version, image_id, op, use_crf, visible, action)

    def _label_edit(self, run_id, version, label, image_id, op, use_crf, visible, what: str,
                    action: Callable[[], str]) -> dict:
        """An edit of one label chosen in 'Label to recolour' (colour, kind)."""
        run_id = H.as_id(run_id, "run")
        if run_id is None:
            raise UserError("no run selected")
        if not label:
            raise UserError(f"choose the label in 'Label to recolour' to {what} (name a cluster first)")
        return self.edit(run_id, version, H.as_id(image_id, "image"), op, use_crf, visible, action)

    @guard
    def on_colour(self, run_id, version, label, colour, image_id, op, use_crf, visible):
        hex_colour = colour_hex(colour)

        def action() -> str:
            mapping.set_label_colour(self.ctx, H.as_id(run_id, "run"), label, hex_colour)
            return f"'{label}' is now shown in {hex_colour}."
        return self._label_edit(run_id, version, label, image_id, op, use_crf, visible, "recolour", action)

    @guard
    def on_kind(self, run_id, version, label, kind, image_id, op, use_crf, visible):
        def action() -> str:
            kinds = label_kinds.set_label_kind(self.ctx, H.as_id(run_id, "run"), label, kind or "auto")
            k = next(k for k in kinds if k.name.lower() == str(label).lower())
            return f"'{k.name}' is exported as {k.kind}" + (" (guessed from the name)." if k.guessed else ".")
        return self._label_edit(run_id, version, label, image_id, op, use_crf, visible, "set the kind of",
                                action)

    def wire(self) -> None:
        app = self.app
        explore_inputs = app.explore.inputs
        label_outputs = app.label_outputs
        edit_inputs = [app.run_dd, self.shown_version, self.cluster_sel]
        self.name_btn.click(self.on_name, edit_inputs + [self.label_name] + explore_inputs,
                            label_outputs + [self.label_name])
        self.unmerge_btn.click(self.on_unmerge, edit_inputs + explore_inputs, label_outputs + [self.unname_md])
        self.unname_yes.click(self.on_unname_confirmed, edit_inputs + explore_inputs, label_outputs)
        self.unname_no.click(lambda: gr.update(visible=False), None, [self.unname_row])
        self.ignore_btn.click(self.on_ignore, edit_inputs + explore_inputs, label_outputs)
        self.unignore_btn.click(self.on_unignore, edit_inputs + explore_inputs, label_outputs)
        self.colour_btn.click(self.on_colour, [app.run_dd, self.shown_version, self.colour_label, self.colour_pick]
                              + explore_inputs, label_outputs)
        self.kind_btn.click(self.on_kind, [app.run_dd, self.shown_version, self.colour_label, self.kind_pick]
                            + explore_inputs, label_outputs)
        self.naming.wire(guard, app.run_dd, self.shown_version, self.cluster_sel, explore_inputs, label_outputs, app.label_views)
        self.refine.wire(guard, app.run_dd, app.discover.timer, app.run_state)
