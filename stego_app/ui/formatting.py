"""Pure formatting helpers for the Gradio UI (the stego_app.ui tab modules).

Everything here turns service dataclasses into what a component displays (markdown,
HTML, table rows, data frames, dropdown choices) or parses a dropdown value. No I/O, no database, no Gradio: tested directly in tests/test_ui_helpers.py.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from core.constants import STAGES
from stego_app.errors import UserError
from stego_app.models import RUN_ACTIVE, RUN_RESUMABLE, RunStatus

# The words a person sees for each pipeline stage (core.constants.STAGES).
STAGE_TITLES: dict[str, str] = {
    "features": "Backbone features",
    "knn": "Nearest neighbours",
    "training": "Training the STEGO head",
    "clustering": "Clustering",
    "segments": "Segmenting images",
    "crf": "CRF refinement",
}
STATUS_WORDS: dict[str, str] = {
    RunStatus.QUEUED: "Queued",
    RunStatus.RUNNING: "Running",
    RunStatus.CANCELLED: "Cancelled",
    RunStatus.FAILED: "Failed",
    RunStatus.INTERRUPTED: "Interrupted",
    RunStatus.DONE: "Finished",
}
LOSS_TERMS: tuple[str, ...] = ("loss", "self", "knn", "neg")


def esc(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def count(n: int, word: str) -> str:
    """'1 image', '12 images'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_share(share: float | None) -> str:
    """0.1234 -> '12.3%'; tiny non-zero shares are shown as '<0.1%'."""
    if share is None or (isinstance(share, float) and math.isnan(share)):
        return "–"
    pct = 100.0 * float(share)
    if 0 < pct < 0.05:
        return "<0.1%"
    return f"{pct:.1f}%"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def image_data_uri(rgb: Any, quality: int = 85) -> str:
    """An (H, W, 3) uint8 array as an inline 'data:image/jpeg;base64,...' URI (thumbnails in HTML)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def as_id(value: Any, what: str = "item") -> int | None:
    """A dropdown value as a database id: None stays None, '3'/3.0 -> 3, junk -> UserError.

    (The project/run/image dropdowns accept values that are not among their current
    choices, so a tab left open while the server restarts keeps working.)
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, bool):
        raise UserError(f"choose a {what} from the list")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"choose a {what} from the list") from None
    if not f.is_integer():
        raise UserError(f"choose a {what} from the list")
    return int(f)


# ---------------------------------------------------------------- projects and ingest

def project_choices(projects: Iterable[Any]) -> list[tuple[str, int]]:
    """Dropdown choices (label, id) for ProjectInfo objects."""
    out = []
    for p in projects:
        n = getattr(p, "n_images", None)
        suffix = f" ({count(n, 'image')})" if n is not None else ""
        out.append((f"{p.name}{suffix}", int(p.id)))
    return out


def ingest_summary(report: Any) -> str:
    """Markdown summary of an IngestReport."""
    added, dups, rej = report.added, report.duplicates, report.rejected
    parts = [f"**{len(added)}** image{'s' if len(added) != 1 else ''} added"]
    if report.repaired:
        parts[0] += (f" ({len(report.repaired)} a good copy of an unreadable image, which can be used "
                     f"again: resume the job that failed on it)")
    if dups:
        parts.append(f"**{len(dups)}** duplicate{'s' if len(dups) != 1 else ''} skipped")
    if rej:
        parts.append(f"**{len(rej)}** file{'s' if len(rej) != 1 else ''} rejected")
    text = ", ".join(parts) + "."
    if dups or rej:
        text += " Problems are listed below."
    return text


def ingest_problem_rows(report: Any) -> list[list[str]]:
    """Table rows [file, problem kind, reason] of the duplicates and rejected files."""
    rows = [[p.name, "rejected", p.reason] for p in report.rejected]
    rows += [[p.name, "duplicate", p.reason] for p in report.duplicates]
    return rows


def images_summary(images: Sequence[Any]) -> str:
    ok = [i for i in images if getattr(i, "status", "ok") == "ok"]
    bad = len(images) - len(ok)
    text = f"**{len(ok)}** usable image{'s' if len(ok) != 1 else ''} in this project"
    if bad:
        text += f" ({bad} unreadable or missing)"
    return text + "."


def page_caption(start: int, stop: int, total: int) -> str:
    """'images 101–200 of 5,000' (what a gallery page shows)."""
    if total == 0:
        return "no images"
    return f"images {start + 1:,}–{stop:,} of {total:,}"


# ---------------------------------------------------------------- runs

def run_choice_label(run: Any) -> str:
    """'Run 3 · Finished · dinov2_vits14 · 8 clusters · 40 images'. Queued and running read the same
    ('In progress'): the list is redrawn when a run stops, not when the worker picks it up, which can
    happen between drawing the list and the status box (the status box tells the two apart)."""
    params = run.params
    backbone = run.backbone or params.backbone or "automatic backbone"
    status = "In progress" if run.status in RUN_ACTIVE else STATUS_WORDS.get(run.status, run.status)
    return (f"Run {run.id} · {status} · {backbone} · {params.n_clusters} clusters · "
            f"{count(run.n_images, 'image')}")


def run_choices(runs: Iterable[Any]) -> list[tuple[str, int]]:
    return [(run_choice_label(r), int(r.id)) for r in runs]


def run_stages(run: Any) -> list[str]:
    return [s for s in STAGES if s != "crf" or run.params.crf]


def stage_states(run: Any) -> list[tuple[str, str, float]]:
    """[(stage, state, fraction)], state one of done|active|pending|stopped."""
    stages = run_stages(run)
    timings = run.timings or {}
    current = run.stage if run.stage in stages else None
    cur_i = stages.index(current) if current else -1
    out = []
    for i, s in enumerate(stages):
        if run.status == RunStatus.DONE:
            out.append((s, "done", 1.0))
        elif current is not None and i < cur_i:
            out.append((s, "done", 1.0))
        elif s == current:
            frac = float(run.stage_progress or 0.0)
            if run.status in RUN_ACTIVE:
                out.append((s, "done" if frac >= 1.0 and s in timings else "active", frac))
            else:
                out.append((s, "stopped", frac))
        elif current is None and s in timings:
            out.append((s, "done", 1.0))
        else:
            out.append((s, "pending", 0.0))
    return out


def _time_text(elapsed: float | None, remaining: float | None, running: bool) -> str:
    if elapsed is None:
        return f"about {format_seconds(remaining)}" if running and remaining else ""
    text = format_seconds(elapsed)
    if running and remaining:
        text += f" · about {format_seconds(remaining)} left"
    return text


def run_status_html(run: Any | None, times: Any | None = None, note: str = "") -> str:
    """Per-stage progress of a run as HTML (bars, state words, elapsed and remaining time, errors).

    `times`: stego_app.eta.RunTimes of the run; `note`: a warning line (e.g. removed images)."""
    if run is None:
        return ('<div class="stego-status" id="run-status-box"><p>No run selected. '
                'Choose the settings above and press <b>Start discovery</b>.</p></div>')
    status = STATUS_WORDS.get(run.status, run.status)
    lines = [f'<div class="stego-status" id="run-status-box" data-status="{esc(run.status)}">',
             f'<p class="stego-status-head"><b>Run {run.id}</b>: '
             f'<span class="stego-state stego-state-{esc(run.status)}">{esc(status)}</span>'
             f' · overall {100 * float(run.progress or 0):.0f}%']
    running = run.status == RunStatus.RUNNING
    if times is not None and (times.elapsed or times.remaining):
        lines.append(f' · <span class="stego-run-time">{esc(_time_text(times.elapsed, times.remaining, running))}'
                     f'{"" if not running or times.remaining else " · time left: estimating…"}</span>')
    if run.cancel_requested and running:
        lines.append(" · cancelling…")
    lines.append("</p>")
    if run.weights_source:
        lines.append(f'<p class="stego-muted" title="{esc(run.weights_source)}">Backbone {esc(run.backbone or "")}: '
                     f'weights from {esc(weights_caption(run.weights_source))}</p>')
    lines.append('<table class="stego-stages">')
    timings = run.timings or {}
    for stage, state, frac in stage_states(run):
        pct = 100.0 * max(0.0, min(1.0, frac))
        word = {"done": "done", "active": f"{pct:.0f}%", "pending": "waiting",
                "stopped": f"stopped at {pct:.0f}%"}[state]
        st = times.stage(stage) if times is not None else None
        if st is not None and (st.elapsed is not None or (running and st.remaining)):
            t = _time_text(st.elapsed, st.remaining, running and state in ("active", "pending"))
        else:
            t = format_seconds(timings.get(stage)) if stage in timings else ""
        lines.append(
            f'<tr class="stego-stage stego-stage-{state}" data-stage="{stage}">'
            f'<td class="stego-stage-name">{esc(STAGE_TITLES.get(stage, stage))}</td>'
            f'<td class="stego-bar-cell"><div class="stego-bar"><div class="stego-bar-fill" '
            f'style="width:{pct:.1f}%"></div></div></td>'
            f'<td class="stego-stage-word">{esc(word)}</td><td class="stego-muted stego-stage-time">{esc(t)}</td></tr>')
    lines.append("</table>")
    if note:
        lines.append(f'<p class="stego-warning" id="run-stale-note">{esc(note)}</p>')
    if run.error and run.status in RUN_RESUMABLE:
        lines.append(f'<p class="stego-error">{esc(run.error)}</p>')
    if run.status in RUN_RESUMABLE:
        lines.append('<p class="stego-muted">Press <b>Resume</b> to continue; finished stages are reused.</p>')
    if run.status == RunStatus.DONE:
        lines.append('<p>Open the <b>Clusters</b> tab to name what was found.</p>')
    lines.append("</div>")
    return "".join(lines)


def weights_caption(source: str) -> str:
    """Where a run's weights came from, without the server's paths (the full text is the tooltip):
    'cache /srv/.../x.safetensors (from the Hub ...)' -> 'the Hub ... (cached)', 'file /a/b.pth' -> 'file b.pth'."""
    cached = re.fullmatch(r"cache \S.* \(from (.+)\)", source)
    if cached:
        return f"{cached.group(1)} (cached)"
    if source.startswith("file "):
        return f"file {Path(source[5:]).name}"
    return source


def loss_rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Training history -> long-format rows {'step', 'value', 'term'} for a line plot."""
    rows = []
    for i, point in enumerate(history or []):
        step = point.get("step", i + 1)
        for term in LOSS_TERMS:
            v = point.get(term)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                rows.append({"step": int(step), "value": float(v), "term": term})
    return rows


def status_signature(run: Any | None) -> tuple:
    """What, if unchanged between two polls, means nothing on the page needs redrawing."""
    if run is None:
        return (None,)
    return (run.id, run.status, run.stage, round(float(run.stage_progress or 0), 3),
            len(run.history or []), run.cancel_requested, run.error)


# ---------------------------------------------------------------- clusters and legend

def cluster_title(c: Any) -> str:
    name = c.label_name or f"cluster {c.index}"
    return f"{name} (ignored)" if c.ignored else name


def cluster_choices(clusters: Iterable[Any]) -> list[tuple[str, int]]:
    """CheckboxGroup choices: '#3 sky · 12.5%' -> cluster index."""
    out = []
    for c in clusters:
        label = f"#{c.index}"
        if c.label_name:
            label += f" {c.label_name}"
        if c.ignored:
            label += " (ignored)"
        out.append((f"{label} · {format_share(c.share)}", int(c.index)))
    return out


def label_names(clusters: Iterable[Any]) -> list[str]:
    """Distinct label names in first-seen order."""
    seen: list[str] = []
    for c in clusters:
        if c.label_name and c.label_name not in seen:
            seen.append(c.label_name)
    return seen


def swatch(colour: str, size: int = 14) -> str:
    return (f'<span class="stego-swatch" style="background:{esc(colour)};width:{size}px;'
            f'height:{size}px"></span>')


def cluster_cards_html(clusters: Sequence[Any], example_url: Callable[[Any, int], str | None],
                       max_examples: int = 4) -> str:
    """A card per cluster: swatch, name, share, state and the most confident examples.

    `example_url(cluster, image_id)` gives a thumbnail URL (or None to skip it).
    """
    if not clusters:
        return ('<div class="stego-cards" id="cluster-cards"><p>No clusters yet: run discovery '
                'in the <b>Discover</b> tab, then select the finished run above.</p></div>')
    out = ['<div class="stego-cards" id="cluster-cards">']
    out += [cluster_card_html(c, example_url, max_examples) for c in clusters]
    out.append("</div>")
    return "".join(out)


def cluster_card_html(c: Any, example_url: Callable[[Any, int], str | None], max_examples: int = 4) -> str:
    """One cluster card (see cluster_cards_html)."""
    out = []
    cls = "stego-card stego-card-ignored" if c.ignored else "stego-card"
    label = esc(c.label_name) if c.label_name else '<i>unnamed</i>'
    out.append(f'<div class="{cls}" data-cluster="{int(c.index)}" '
               f'data-label="{esc(c.label_name or "")}" data-ignored="{int(bool(c.ignored))}">')
    out.append(f'<div class="stego-card-head">{swatch(c.colour, 18)}'
               f'<span class="stego-card-index">#{int(c.index)}</span> '
               f'<span class="stego-card-label">{label}</span>'
               f'<span class="stego-card-share">{format_share(c.share)}</span></div>')
    if c.ignored:
        out.append('<div class="stego-muted">ignored: left out of exports</div>')
    out.append('<div class="stego-card-examples">')
    shown = 0
    for image_id in list(c.example_image_ids or [])[:max_examples]:
        url = example_url(c, image_id)
        if url:
            out.append(f'<img src="{esc(url)}" alt="example of cluster {int(c.index)}" loading="lazy">')
            shown += 1
    if shown == 0:
        out.append('<span class="stego-muted">no examples</span>')
    out.append("</div></div>")
    return "".join(out)


def legend_html(entries: Sequence[Any], elem_id: str = "legend") -> str:
    """Legend entries (LegendEntry: name, colour, share, cluster indices, ignored) as HTML."""
    if not entries:
        return f'<div class="stego-legend" id="{esc(elem_id)}"></div>'
    out = [f'<div class="stego-legend" id="{esc(elem_id)}">']
    for e in entries:
        ignored = bool(getattr(e, "ignored", False))
        idx = list(getattr(e, "cluster_indices", []) or [])
        clusters = ", ".join(f"#{i}" for i in idx)
        out.append(f'<span class="stego-legend-item{" stego-legend-ignored" if ignored else ""}" '
                   f'data-name="{esc(e.name)}">{swatch(e.colour)}<b>{esc(e.name)}</b> '
                   f'{format_share(e.share)}'
                   + (f' <span class="stego-muted">({esc(clusters)})</span>'
                      if clusters and not _names_its_cluster(e) else "")
                   + (' <span class="stego-muted">ignored</span>' if ignored else "")
                   + "</span>")
    out.append("</div>")
    return "".join(out)


def _names_its_cluster(entry: Any) -> bool:
    """An unnamed cluster's entry ('cluster 3') already says which cluster it is."""
    idx = tuple(getattr(entry, "cluster_indices", ()) or ())
    return (getattr(entry, "label_id", None) is None and not getattr(entry, "ignored", False)
            and len(idx) == 1)


def visible_cluster_choices(clusters: Iterable[Any]) -> list[tuple[str, int]]:
    """Per-cluster overlay toggles: '#3 sky' -> 3."""
    out = []
    for c in clusters:
        label = f"#{c.index}" + (f" {c.label_name}" if c.label_name else "")
        if c.ignored:
            label += " (ignored)"
        out.append((label, int(c.index)))
    return out


def hidden_clusters(all_indices: Iterable[int], shown: Iterable[int] | None) -> list[int]:
    shown_set = {int(i) for i in (shown or [])}
    return [int(i) for i in all_indices if int(i) not in shown_set]


# ---------------------------------------------------------------- export

def export_summary(info: Any) -> str:
    """Markdown summary of an ExportInfo."""
    parts = [f"Export **{info.id}** written"]
    for attr, word in (("n_images", "images"), ("n_annotations", "annotations"),
                       ("n_categories", "categories")):
        v = getattr(info, attr, None)
        if v is not None:
            parts.append(f"{v} {word}")
    text = parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "") + "."
    maps = getattr(info, "maps_used", None)
    if maps:
        text += f" Segment maps used: **{maps}**" + (" (propagated from the names)." if maps == "refined" else ".")
    picked = list(getattr(info, "to_correct_images", None) or [])
    if picked:
        text += (f"\n\nThe {count(len(picked), 'image')} to correct first, most useful first: "
                 + ", ".join(esc(name) for name in picked)
                 + ". Correct them in your annotation tool, then import them in Clusters → *Import corrected "
                   "annotations* and refine with names.")
        done = int(getattr(info, "to_correct_done", 0) or 0)
        if done:
            text += (f" {count(done, 'image')} whose corrections are already imported "
                     f"{'was' if done == 1 else 'were'} left out: this is the next batch.")
    warnings = list(getattr(info, "warnings", None) or [])
    for w in warnings:
        text += f"\n\n- ⚠ {w}"
    return text


def kinds_text(kinds) -> str:
    """One line: which labels export as things and which as stuff (label_kinds.LabelKind list)."""
    if not kinds:
        return ""
    def names(want: bool) -> str:
        return ", ".join(k.name + (" (guessed)" if k.guessed else "") for k in kinds if k.isthing == want) or "none"
    return (f"**Things** (one annotation per object): {esc(names(True))} · **Stuff** (one region per image): "
            f"{esc(names(False))}")


def unname_question(lost: list[str], corrected: set[str]) -> str:
    """The question before taking the last cluster off each name in ``lost``."""
    def quoted(names):
        return ", ".join(f"'{n}'" for n in names)
    kept = [n for n in lost if n in corrected]
    gone = [n for n in lost if n not in corrected]
    parts = []
    if gone:
        parts.append(f"undoing deletes the name {quoted(gone)}")
    if kept:
        parts.append(f"the imported corrections drawn as {quoted(kept)} keep the name, unused until a "
                     "cluster carries it again")
    return f"No other cluster is named {quoted(lost)}: " + "; ".join(parts) + ". Remove it?"
