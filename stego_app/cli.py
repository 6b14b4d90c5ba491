"""Command line: the same services as the browser app, for scripting.

    python app.py [serve]            the browser app (default)
    python app.py ingest --project P [--create] PATH...
    python app.py images --project P | remove --project P IMAGE...
    python app.py run --project P [--clusters K --steps N ...] | --resume RUN_ID
    python app.py status [RUN_ID] [--project P] [--json]
    python app.py label RUN_ID list|name|rename|merge|unmerge|ignore|colour|kind|confirm|import-corrections|corrections|forget-corrections ...
    python app.py label RUN_ID groups|name-group|suggest|to-correct|find|refine ...
    python app.py export RUN_ID [--style masks|polygons] [--include-images] [--label-studio] [--no-refined] ...
    python app.py evaluate ...

Exit status: 0 success, 2 a problem the user can fix (the message says what),
1 an unexpected error, 3 a run that failed, 4 a run that was cancelled or interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from core.constants import FIND_THRESHOLD, REFINE_OPTIONS, TO_CORRECT_COUNT
from stego_app import cli_images
from stego_app.config import AppConfig, parse_auth
from stego_app.errors import UserError
from stego_app.models import RunStatus

log = logging.getLogger("stego_app.cli")

COMMANDS = ("serve", "ingest", "images", "remove", "run", "status", "label", "export", "evaluate")
EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_RUN_FAILED, EXIT_RUN_STOPPED = 0, 1, 2, 3, 4


# ---------------------------------------------------------------- parser

def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand."""
    d = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("storage and model")
    g.add_argument("--data-dir", default=d, help="data folder (default ./data or STEGO_DATA_DIR)")
    g.add_argument("--database-url", default=d,
                   help="SQLAlchemy URL (default sqlite:///<data-dir>/stego.db or STEGO_DATABASE_URL)")
    g.add_argument("--cache-dir", default=d, help="feature/weights cache (default <data-dir>/cache)")
    g.add_argument("--allowed-root", action="append", default=d, metavar="DIR",
                   help="server folder people may ingest from (repeatable; STEGO_ALLOWED_ROOTS)")
    g.add_argument("--backbone", default=d, help="backbone name (default: best available)")
    g.add_argument("--weights", default=d, help="checkpoint file for the backbone")
    g.add_argument("--device", default=d, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--ray", default=d, metavar="ADDRESS", dest="ray_address",
                   help="run features and segments/CRF on a Ray cluster: host:port, ray://host:10001, or auto "
                        "(a local cluster); STEGO_RAY_ADDRESS; needs requirements-ray.txt")
    g.add_argument("--ray-staging", default=d, metavar="URL", dest="ray_staging",
                   help="where Ray workers put finished feature shards: a path every node mounts, or an "
                        "fsspec URL such as s3://bucket/stego (credentials as the store's client reads them "
                        "on every node); STEGO_RAY_STAGING; default: inside the feature store")
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if suppress else 0,
                   help="more log output (-vv for debug)")
    return p


def _add_run_params(p: argparse.ArgumentParser) -> None:
    from stego_app.cli_settings import add_settings_arguments

    # the backbone is the common --backbone (the server's choice, also used by serve)
    add_settings_arguments(p, exclude=("backbone",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py", parents=[_common(False)],
        description="STEGO labeler: discover segmentation classes in an image corpus without labels, "
                    "name them, and export COCO seed annotations.",
        epilog="Without a command the browser app starts (serve). "
               "`app.py COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common(True)

    p = sub.add_parser("serve", parents=[common], help="start the browser app (default)")
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require a login (STEGO_AUTH)")
    p.add_argument("--no-demo", action="store_true", help="do not create the demo project")

    p = sub.add_parser("ingest", parents=[common], help="add images (files, .zip archives, folders)")
    p.add_argument("--project", required=True, help="project name or id")
    p.add_argument("--create", action="store_true", help="create the project if it does not exist")
    p.add_argument("--description", default="", help="description of a new project")
    p.add_argument("paths", nargs="+", type=Path, help="image files, zip archives or folders")

    cli_images.add_parsers(sub, common)

    p = sub.add_parser("run", parents=[common], help="run the pipeline on a project and wait")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--project", help="project name or id")
    g.add_argument("--resume", type=int, metavar="RUN_ID", help="resume an interrupted/failed/cancelled run")
    _add_run_params(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser("status", parents=[common], help="projects, runs and progress")
    p.add_argument("run_id", nargs="?", type=int, help="show one run in detail")
    p.add_argument("--project", help="list the runs of one project")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("label", parents=[common], help="name, merge, ignore clusters of a run")
    p.add_argument("run_id", type=int)
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = acts.add_parser("list", parents=[common], help="clusters and their labels")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("name", parents=[common], help="give cluster IDX a label (an existing name merges)")
    a.add_argument("index", type=int)
    a.add_argument("name")
    a = acts.add_parser("rename", parents=[common], help="rename a label (an existing name merges the labels)")
    a.add_argument("old")
    a.add_argument("new")
    a = acts.add_parser("merge", parents=[common], help="map several clusters to one label")
    a.add_argument("indices", type=int, nargs="+")
    a.add_argument("--name", required=True)
    a = acts.add_parser("unmerge", parents=[common], help="make a cluster unnamed again")
    a.add_argument("index", type=int)
    a = acts.add_parser("ignore", parents=[common], help="mark a cluster as void")
    a.add_argument("index", type=int)
    a.add_argument("--undo", action="store_true", help="bring it back as unnamed")
    a = acts.add_parser("colour", parents=[common], aliases=["color"], help="set a label's colour")
    a.add_argument("name")
    a.add_argument("colour", help="#rrggbb")
    a = acts.add_parser("kind", parents=[common],
                        help="thing (objects, one annotation each) or stuff (regions); no args: list")
    a.add_argument("name", nargs="?")
    a.add_argument("kind", nargs="?", choices=("thing", "stuff", "auto"))
    a = acts.add_parser("confirm", parents=[common], help="mark images as checked by a person")
    a.add_argument("image_ids", type=int, nargs="+")
    a.add_argument("--undo", action="store_true")
    a = acts.add_parser("import-corrections", parents=[common],
                        help="import masks corrected in an annotation tool (COCO .json, the tool's .zip, "
                             "or Label Studio's JSON export)")
    a.add_argument("file", type=Path)
    acts.add_parser("corrections", parents=[common],
                    help="list the images with imported corrections and whether the refined maps hold them")
    a = acts.add_parser("forget-corrections", parents=[common],
                        help="forget the imported corrections of images (they stay checked)")
    a.add_argument("image_ids", type=int, nargs="+")
    _add_group_actions(acts, common)

    p = sub.add_parser("export", parents=[common], help="export a run as COCO / Label Studio (zip)")
    p.add_argument("run_id", type=int)
    from stego_app.export import add_cli_arguments
    add_cli_arguments(p)

    sub.add_parser("evaluate", parents=[common], add_help=False,
                   help="evaluate on a labelled dataset (see `evaluate --help`)")
    return parser


def _add_group_actions(acts, common: argparse.ArgumentParser) -> None:
    """label RUN groups | name-group | suggest | to-correct | find | refine (stego_app.groups, to_correct, found,
    refinement)."""
    a = acts.add_parser("groups", parents=[common], help="clusters in groups of similar ones, naming progress")
    a.add_argument("--groups", type=int, default=None, dest="n_groups", help="number of groups (default ~K/4)")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("name-group", parents=[common], help="name every unnamed cluster of group G at once")
    a.add_argument("group", type=int)
    a.add_argument("name")
    a.add_argument("--groups", type=int, default=None, dest="n_groups", help="the --groups the list used")
    a.add_argument("--all", action="store_true", help="also rename the group's clusters that have a label")
    a = acts.add_parser("suggest", parents=[common], help="merge suggestions: unnamed clusters that look alike")
    a.add_argument("-n", type=int, default=10)
    a.add_argument("--accept", type=int, metavar="I", help="apply suggestion number I (1-based) of the list")
    a.add_argument("--name", help="name for a pair of unnamed clusters (with --accept)")
    a = acts.add_parser("find", parents=[common],
                        help="new cluster from the region like pixel X Y of an image (click-to-find)")
    a.add_argument("image_id", type=int)
    a.add_argument("x", type=float)
    a.add_argument("y", type=float)
    a.add_argument("--threshold", type=float, default=None, help=f"cosine similarity (default {FIND_THRESHOLD})")
    a.add_argument("--name", help="name it (an existing label's name adds it to that label)")
    a.add_argument("--dry-run", action="store_true", help="only report the best matches")
    a = acts.add_parser("to-correct", parents=[common],
                        help="the images to correct next in an annotation tool (one typical image of each "
                             "kind of scene, most useful first; images whose corrections are imported are "
                             "left out, so asking again after an import gives the next batch)")
    a.add_argument("-n", type=int, default=TO_CORRECT_COUNT, help=f"how many (default {TO_CORRECT_COUNT})")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("refine", parents=[common],
                        help="refine with names: propagate the names to every pixel (waits)")
    a.add_argument("--resume", type=int, metavar="REFINEMENT_ID", help="resume a stopped refinement")
    a.add_argument("--steps", type=int, default=None, help=REFINE_OPTIONS["steps"][1])
    a.add_argument("--dense", action=argparse.BooleanOptionalAction, default=None,
                   help=REFINE_OPTIONS["dense"][1] + " (default: on with a GPU, off on a CPU)")
    a.add_argument("--quiet", action="store_true")


def _label_groups(ctx, args: argparse.Namespace) -> int:
    from stego_app import found, groups, refinement, to_correct

    act, rid = args.action, args.run_id
    if act == "groups":
        gs = groups.list_groups(ctx, rid, args.n_groups)
        progress = groups.naming_progress(ctx, rid)
        if args.json:
            _out(json.dumps({"groups": _plain(gs), "progress": _plain(progress)}, indent=2))
            return EXIT_OK
        _out(progress.text)
        for g in gs:
            names = ", ".join(g.label_names) or "-"
            kind = " (found)" if g.found else ""
            _out(f"group {g.id:<3} {g.share:6.1%}  {len(g.cluster_indices)} cluster{'s' if len(g.cluster_indices) != 1 else ''}{kind}: "
                 f"{' '.join(f'#{i}' for i in g.cluster_indices)}  labels: {names}"
                 + (f"  unnamed: {' '.join(f'#{i}' for i in g.unnamed)}" if g.unnamed else ""))
        return EXIT_OK
    if act == "name-group":
        clusters = groups.name_group(ctx, rid, args.group, args.name, args.n_groups, only_unnamed=not args.all)
        n = sum(1 for c in clusters if (c.label_name or "").lower() == " ".join(args.name.split()).lower())
        verb = "cluster is" if n == 1 else "clusters are"
        _out(f"{n} {verb} now '{' '.join(args.name.split())}'; {groups.naming_progress(ctx, rid).text}")
        return EXIT_OK
    if act == "suggest":
        sugg = groups.merge_suggestions(ctx, rid, max(args.n, args.accept or 0))
        if args.accept is not None:
            if not 1 <= args.accept <= len(sugg):
                raise UserError(f"there are {len(sugg)} suggestions; --accept takes 1..{len(sugg)}")
            s = sugg[args.accept - 1]
            groups.accept_suggestion(ctx, rid, s.cluster_index, s.similar_to[0], s.label_name, args.name)
            _out(f"accepted: {s.text}")
            return EXIT_OK
        if not sugg:
            _out("no suggestions: every cluster is named or ignored")
        for k, s in enumerate(sugg, 1):
            _out(f"{k:>3}. {s.text}")
        return EXIT_OK
    if act == "to-correct":
        picked = to_correct.images_to_correct(ctx, rid, args.n)
        if args.json:
            _out(json.dumps(_plain(picked), indent=2))
            return EXIT_OK
        for p in picked:
            _out(f"{p.rank:>3}. image {p.image_id:<6} {p.name}")
        if done := len(to_correct.corrected_ids(ctx, rid)):
            _out(f"{done} image(s) whose corrections are already imported are left out: this is the next batch")
        _out(f"correct these in your annotation tool (export them with: app.py export {rid} --to-correct "
             f"{len(picked)}), then import them with: app.py label {rid} import-corrections FILE")
        return EXIT_OK
    if act == "find":
        threshold = found.DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        res = found.query(ctx, rid, args.image_id, args.x, args.y, threshold=threshold)
        _out(f"cell {res.cell} of a {res.grid[0]}x{res.grid[1]} grid: ~{res.corpus_share:.1%} of all pixels "
             f"reach {threshold:.2f}")
        for m in res.matches:
            _out(f"  image {m.image_id:<6} {m.name}: best {m.similarity:.3f}, {m.coverage:.1%} of it")
        if not args.dry_run:
            info = found.create_cluster(ctx, rid, args.image_id, res.cell, threshold, args.name)
            _out(f"cluster {info.index} created ({info.share:.1%} of pixels)"
                 + (f", named '{info.label_name}'" if info.label_name else ""))
        return EXIT_OK
    # refine
    if args.resume is not None:
        info = refinement.resume_refinement(ctx, args.resume)
    else:
        params = {k: v for k, v in (("steps", args.steps), ("dense", args.dense)) if v is not None}
        stopped = refinement.latest_refinement(ctx, rid)
        info = refinement.start_refinement(ctx, rid, params or None)
        if stopped is not None and stopped.is_resumable:
            _out(f"refinement {stopped.id} stopped ({stopped.status}) at {_pct(stopped.progress).strip()}; "
                 f"this starts over as refinement {info.id} (app.py label {rid} refine --resume {stopped.id} "
                 f"continues the stopped one, with the names it started with)")
    last = None
    try:
        while info.is_active:
            key = (info.stage, round(info.progress, 2))
            if not args.quiet and key != last and info.stage:
                _out(f"  {_pct(info.progress)}  {info.stage}")
                last = key
            time.sleep(0.5)
            info = refinement.get_refinement(ctx, info.id)
    except KeyboardInterrupt:
        _out(f"stopping (resume with: app.py label {rid} refine --resume {info.id}) ...")
        refinement.cancel_refinement(ctx, info.id)
        info = refinement.wait_for_refinement(ctx, info.id, timeout=120)
    _out(f"refinement {info.id}: {info.status}" + (f" - {info.error}" if info.error else ""))
    if info.status == "done":
        _out(refinement.refined_state(ctx, rid).text)
        return EXIT_OK
    return EXIT_RUN_FAILED if info.status == "failed" else EXIT_RUN_STOPPED


GROUP_ACTIONS = ("groups", "name-group", "suggest", "to-correct", "find", "refine")


def _with_default_command(argv: list[str]) -> list[str]:
    if {"-h", "--help"} & set(argv) and not any(a in COMMANDS for a in argv):
        return argv
    if not any(a in COMMANDS for a in argv):
        return ["serve", *argv]
    return argv


# ---------------------------------------------------------------- helpers

def _config(args: argparse.Namespace, **extra) -> AppConfig:
    flags = dict(
        data_dir=getattr(args, "data_dir", None), database_url=getattr(args, "database_url", None),
        cache_dir=getattr(args, "cache_dir", None), allowed_roots=getattr(args, "allowed_root", None),
        backbone=getattr(args, "backbone", None), weights=getattr(args, "weights", None),
        device=getattr(args, "device", None), ray_address=getattr(args, "ray_address", None),
        ray_staging=getattr(args, "ray_staging", None))
    flags.update(extra)
    return AppConfig.from_env(**flags)


def _context(args: argparse.Namespace, worker: bool = False, **extra):
    from stego_app.context import create_context

    return create_context(_config(args, worker=worker, **extra))


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


# ---------------------------------------------------------------- commands

def cmd_serve(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"host": args.host, "port": args.port}
    if args.auth:
        extra["auth"] = parse_auth(args.auth)
    if args.no_demo:
        extra["demo"] = False
    from stego_app.projects import ensure_demo_project

    ctx = _context(args, worker=True, **extra)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, systemd) closes the context: a running job is left 'interrupted'
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if ctx.config.demo:
            demo = ensure_demo_project(ctx)
            if demo is not None:
                log.info("demo project %r created with %d images", demo.name, demo.n_images)
        from stego_app import ui  # gradio is imported only here

        ui.launch(ctx)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        ctx.close()
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    import zipfile

    from stego_app import ingest, projects

    folders = [p.resolve() for p in args.paths if p.is_dir()]
    roots = list(_config(args).allowed_roots) + folders   # folders named on the command line are allowed
    ctx = _context(args, allowed_roots=roots)
    try:
        try:
            project = projects.find_project(ctx, args.project)
        except UserError:
            if not args.create:
                raise UserError(f"no project {args.project!r}; add --create to make it") from None
            project = projects.create_project(ctx, args.project, args.description)
            _out(f"created project {project.id} {project.name!r}")
        reports = []
        files = []
        for path in args.paths:
            if path.is_dir():
                reports.append(ingest.ingest_folder(ctx, project.id, str(path.resolve())))
            elif path.is_file() and zipfile.is_zipfile(path):
                reports.append(ingest.ingest_zip(ctx, project.id, path).within(path.name))
            else:
                files.append(path)
        if files:
            reports.append(ingest.ingest_files(ctx, project.id, files, [str(f) for f in files]))
        added = sum(len(r.added) for r in reports)
        for r in reports:
            for prob in r.duplicates:
                _out(f"duplicate  {prob.name}: {prob.reason}")
            for prob in r.rejected:
                _out(f"rejected   {prob.name}: {prob.reason}")
        for r in reports:
            for name in r.repaired:
                _out(f"repaired   {name}: a good copy replaced its unreadable one; resume the job that failed on it")
        n_dup = sum(len(r.duplicates) for r in reports)
        n_rej = sum(len(r.rejected) for r in reports)
        total = projects.get_project(ctx, project.id).n_images
        _out(f"project {project.name!r}: {added} added, {n_dup} duplicates, {n_rej} rejected; "
             f"{total} images in total")
    finally:
        ctx.close()
    verdict = ingest.refusal_message(added, n_dup, n_rej)
    if verdict:
        sys.stderr.write(("error: " if not added else "warning: ") + verdict + "\n")
    return EXIT_OK if added else EXIT_USER


def _params(args: argparse.Namespace):
    """The run's settings: the flags given over the schema's defaults (UserError when out of range)."""
    from core.settings import SettingsError
    from stego_app.cli_settings import settings_error_text, settings_from_args

    try:
        return settings_from_args(args)
    except SettingsError as exc:
        raise UserError(settings_error_text(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from stego_app import projects, runs
    from stego_app.cli_settings import given_settings

    ctx = _context(args, worker=True)
    try:
        if args.resume is not None:
            info = runs.resume_run(ctx, args.resume)
        else:
            project = projects.find_project(ctx, args.project)
            info = runs.start_run(ctx, project.id, _params(args))
        _out(f"run {info.id}: {info.status}, {info.n_images} images, data in {info.run_dir}")
        if args.resume is None and "steps" not in given_settings(args):
            _out(f"  {info.params.steps} training steps, chosen for the corpus size "
                 "(set --steps to choose them)")
        info = _follow(ctx, info.id, quiet=args.quiet)
    finally:
        ctx.close()
    _out(f"run {info.id}: {info.status}" + (f" - {info.error}" if info.error else ""))
    if info.timings:
        _out("  stage times: " + ", ".join(f"{stage} {secs:.1f}s" for stage, secs in info.timings.items()))
    if info.status == RunStatus.DONE:
        _out(f"next: app.py label {info.id} list   |   app.py export {info.id}")
        return EXIT_OK
    return EXIT_RUN_FAILED if info.status == RunStatus.FAILED else EXIT_RUN_STOPPED


def _follow(ctx, run_id: int, quiet: bool = False, poll: float = 0.5):
    """Print progress until the run ends; Ctrl-C cancels it (resumable)."""
    from stego_app import runs
    from stego_app.eta import run_times, times_line

    last = ("", -1.0)
    try:
        while True:
            info = runs.get_run(ctx, run_id)
            key = (info.stage or info.status, round(info.progress, 2))
            if not quiet and key != last:
                loss = ""
                if info.history and "loss" in info.history[-1]:
                    loss = f"  loss {info.history[-1]['loss']:.4f}"
                _out(f"  {_pct(info.progress)}  {info.stage or info.status:<10} "
                     f"{_pct(info.stage_progress)}{loss}  {times_line(run_times(info), info.stage)}")
                last = key
            if not info.is_active:
                return info
            time.sleep(poll)
    except KeyboardInterrupt:
        _out("stopping the run (resume it later with --resume) ...")
        try:
            runs.cancel_run(ctx, run_id)
        except UserError:
            pass
        return runs.wait_for_run(ctx, run_id, timeout=120)


def _run_line(r) -> str:
    when = r.created_at.strftime("%Y-%m-%d %H:%M") if r.created_at else ""
    stage = f" {r.stage} {_pct(r.stage_progress).strip()}" if r.status == RunStatus.RUNNING and r.stage else ""
    return (f"  run {r.id:<4} {r.status:<11} {_pct(r.progress)}{stage}  {r.n_images} images, "
            f"K={r.params.n_clusters}, {r.backbone or 'auto'}  {when}")


def cmd_status(args: argparse.Namespace) -> int:
    from stego_app import projects, runs
    from stego_app.eta import run_times, times_line
    from stego_app.labels import mapping
    from stego_app.removal import removed_in_run, stale_note

    ctx = _context(args)
    try:
        if args.run_id is not None:
            info = runs.get_run(ctx, args.run_id)
            clusters = mapping.list_clusters(ctx, info.id) if info.status == RunStatus.DONE else []
            if args.json:
                _out(json.dumps({"run": _plain(info), "times": _plain(run_times(info)),
                                 "clusters": _plain(clusters)}, indent=2))
                return EXIT_OK
            _out(_run_line(info).strip())
            _out(f"  time: {times_line(run_times(info), info.stage)}")
            _out(f"  weights: {info.weights_source or '-'}")
            _out(f"  settings: {json.dumps(info.params.to_dict())}")
            if info.timings:
                _out("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in info.timings.items()))
            if info.error:
                _out(f"  error: {info.error}")
            if note := stale_note(removed_in_run(ctx, info.id)):
                _out(f"  stale: {note}")
            for c in clusters:
                _out(f"  cluster {c.index:<3} {c.share:6.1%}  {c.colour}  "
                     f"{'(ignored)' if c.ignored else (c.label_name or '-')}")
            return EXIT_OK
        plist = [projects.find_project(ctx, args.project)] if args.project else projects.list_projects(ctx)
        data = [{"project": p, "runs": runs.list_runs(ctx, p.id)} for p in plist]
        if args.json:
            _out(json.dumps(_plain(data), indent=2))
            return EXIT_OK
        if not data:
            _out("no projects yet: app.py ingest --project NAME --create PATH...")
        for item in data:
            p = item["project"]
            _out(f"project {p.id} {p.name!r}: {p.n_images} images, {p.n_runs} runs")
            for r in item["runs"]:
                _out(_run_line(r))
    finally:
        ctx.close()
    return EXIT_OK


def cmd_label(args: argparse.Namespace) -> int:
    from stego_app.labels import annotations, mapping

    ctx = _context(args, worker=args.action == "refine")
    try:
        act = args.action
        rid = args.run_id
        if act in GROUP_ACTIONS:
            return _label_groups(ctx, args)
        if act == "list":
            clusters = mapping.list_clusters(ctx, rid)
        elif act == "name":
            clusters = mapping.name_cluster(ctx, rid, args.index, args.name)
        elif act == "rename":
            clusters = mapping.rename_label(ctx, rid, args.old, args.new)
        elif act == "merge":
            clusters = mapping.merge_clusters(ctx, rid, args.indices, args.name)
        elif act == "unmerge":
            clusters = mapping.unmerge_cluster(ctx, rid, args.index)
        elif act == "ignore":
            clusters = mapping.ignore_cluster(ctx, rid, args.index, not args.undo)
        elif act in ("colour", "color"):
            clusters = mapping.set_label_colour(ctx, rid, args.name, args.colour)
        elif act == "kind":
            from stego_app import label_kinds
            if args.name and not args.kind:
                raise UserError("give the kind too: thing, stuff or auto")
            kinds = (label_kinds.set_label_kind(ctx, rid, args.name, args.kind) if args.name
                     else label_kinds.label_kinds(ctx, rid))
            for k in kinds:
                _out(f"{k.name:<30} {k.kind}{'  (guessed from the name)' if k.guessed else ''}")
            return EXIT_OK
        elif act == "confirm":
            for image_id in args.image_ids:
                annotations.confirm_image(ctx, rid, image_id, not args.undo)
            _out(f"{len(args.image_ids)} image(s) {'un' if args.undo else ''}confirmed in run {rid}; "
                 f"{annotations.confirmed_count(ctx, rid)} confirmed in total")
            return EXIT_OK
        elif act == "import-corrections":
            from stego_app import corrections
            _out(corrections.import_corrections(ctx, rid, args.file).summary())
            return EXIT_OK
        elif act == "corrections":
            from stego_app import refinement
            found = refinement.image_corrections(ctx, rid)
            for c in found:
                _out(f"{c.image_id:>6}  {c.name}  {c.text}")
            _out(f"{len(found)} image(s) of run {rid} with imported corrections")
            return EXIT_OK
        elif act == "forget-corrections":
            from stego_app import corrections
            n = sum(corrections.remove_corrections(ctx, rid, i) for i in args.image_ids)
            _out(f"{n} corrected mask(s) of {len(args.image_ids)} image(s) forgotten in run {rid}")
            return EXIT_OK
        else:  # pragma: no cover - argparse restricts the choices
            raise UserError(f"unknown action {act}")
        if getattr(args, "json", False):
            _out(json.dumps(_plain(clusters), indent=2))
            return EXIT_OK
        for c in clusters:
            name = "(ignored)" if c.ignored else (c.label_name or "-")
            merged = f"  with {', '.join(map(str, c.merged_with))}" if c.merged_with else ""
            _out(f"cluster {c.index:<3} {c.share:6.1%}  {c.colour}  {name}{merged}")
    finally:
        ctx.close()
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from stego_app import export

    options = export.options_from_args(args)
    ctx = _context(args)
    try:
        info = export.export_run(ctx, args.run_id, options)
    finally:
        ctx.close()
    zip_path = getattr(info, "zip_path", None) or getattr(info, "path", None)
    _out(f"export {info.id} of run {info.run_id}: {info.n_images} images, "
         f"{info.n_annotations} annotations, {info.n_categories} categories, "
         f"{getattr(info, 'maps_used', 'raw')} maps")
    for warning in info.warnings:       # on stderr: stdout stays the summary + the zip path
        sys.stderr.write(f"warning: {warning}\n")
    _out(f"  {zip_path}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        from stego_app import evaluate_cli as evaluate
    except ImportError as exc:
        raise UserError(f"the evaluate command is not available: {exc}") from None
    parser = argparse.ArgumentParser(prog="app.py evaluate",
                                     description=(evaluate.__doc__ or "").strip().splitlines()[0]
                                     if evaluate.__doc__ else None)
    evaluate.add_arguments(parser)
    eargs = parser.parse_args(list(rest))
    for key in ("data_dir", "cache_dir", "weights", "device"):
        if getattr(eargs, key, None) is None and getattr(args, key, None) is not None:
            setattr(eargs, key, getattr(args, key))
    if getattr(args, "backbone", None) and not hasattr(eargs, "setting__backbone"):   # app.py --backbone X evaluate
        eargs.setting__backbone = args.backbone
    result = evaluate.run(eargs)
    return int(result) if isinstance(result, int) else EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve, "ingest": cmd_ingest, "run": cmd_run, "status": cmd_status,
    "label": cmd_label, "export": cmd_export,
    "images": cli_images.cmd_images, "remove": cli_images.cmd_remove,
}


def _logging(verbose: int, command: str | None) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose <= 0 and command == "serve":      # the server tells what it is doing
        logging.getLogger("stego_app").setLevel(logging.INFO)
    if verbose <= 1:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of app.py; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _with_default_command(argv)
    parser = build_parser()
    if "evaluate" in argv:
        i = argv.index("evaluate")
        args, rest = parser.parse_known_args(argv[: i + 1])
        rest = argv[i + 1:]
    else:
        args, rest = parser.parse_args(argv), []
    _logging(getattr(args, "verbose", 0) or 0, args.command)
    try:
        if args.command == "evaluate":
            return cmd_evaluate(args, rest)
        if args.command is None:
            parser.print_help()
            return EXIT_USER
        return HANDLERS[args.command](args)
    except UserError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return EXIT_USER
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception:
        log.exception("unexpected error")
        return EXIT_BUG


__all__ = ["main", "build_parser"]
