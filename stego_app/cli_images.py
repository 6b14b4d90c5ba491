"""The `images` and `remove` subcommands: list a project's images, remove some of them."""
from __future__ import annotations

import argparse
import json


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("images", parents=[common], help="list the images of a project (ids, names, sizes)")
    p.add_argument("--project", required=True, help="project name or id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("remove", parents=[common],
                       help="remove images from a project (runs that used them keep showing them)")
    p.add_argument("--project", required=True, help="project name or id")
    p.add_argument("images", nargs="+", help="image ids or names (as `images` lists them)")


def cmd_images(args: argparse.Namespace) -> int:
    from stego_app import cli, ingest, projects

    ctx = cli._context(args)
    try:
        project = projects.find_project(ctx, args.project)
        images = ingest.list_images(ctx, project.id)
    finally:
        ctx.close()
    if args.json:
        cli._out(json.dumps(cli._plain(images), indent=2))
        return cli.EXIT_OK
    for im in images:
        state = "" if im.status == "ok" else f"  ({im.status}: {im.error})"
        cli._out(f"image {im.id:<6} {im.width}x{im.height}  {im.name}{state}")
    n = len(images)
    cli._out(f"project {project.name!r}: {n} image{'s' if n != 1 else ''}")
    return cli.EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    from stego_app import cli, projects, removal

    ctx = cli._context(args)
    try:
        project = projects.find_project(ctx, args.project)
        report = removal.remove_images(ctx, project.id, args.images)
        total = projects.get_project(ctx, project.id).n_images
    finally:
        ctx.close()
    for name in report.deleted:
        cli._out(f"deleted    {name}")
    for name, run_ids in report.kept_for_runs.items():
        cli._out(f"removed    {name} (kept readable for run {', '.join(map(str, run_ids))})")
    for name in report.not_found:
        cli._out(f"not found  {name}")
    cli._out(f"project {project.name!r}: {report.summary()}; {total} images left")
    return cli.EXIT_OK if not report.not_found else cli.EXIT_USER
