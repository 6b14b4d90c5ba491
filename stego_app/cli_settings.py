"""Command-line flags built from the run settings schema (core.settings), for `run` and `evaluate`.

Every setting becomes one flag with the schema's help, limits and default; booleans get
``--name/--no-name``; settings that may be automatic accept ``auto``. Only flags actually
given reach :func:`given_settings`, so a command stores overrides of the schema's defaults.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable

from core.settings import DEFAULTS, GROUPS, RunSettings, SettingsError, Spec, spec, specs

__all__ = ["add_settings_arguments", "given_settings", "settings_from_args", "settings_error_text"]

_PREFIX = "setting__"


def _flag(name: str, sp: Spec) -> str:
    return sp.flag or "--" + name.replace("_", "-")


def _typed(kind: type, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.strip().lower() in ("auto", "none", ""):
            return None
        try:
            return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
                                             + (" (or auto)" if optional else "")) from None
    parse.__name__ = kind.__name__
    return parse


def _help(name: str, kind: type, sp: Spec, default: Any, override: str | None) -> str:
    parts = [sp.help]
    limits = sp.limits_text()
    if limits and not sp.choices:
        parts.append(limits)
    if override is not None:
        parts.append(f"default: {override}")
    elif default is None:
        parts.append(f"default: auto = {sp.auto}")
    elif kind is not bool:
        parts.append(f"default: {default}")
    else:
        parts.append(f"default: {'on' if default else 'off'}")
    return "; ".join(parts).replace("%", "%%")


def add_settings_arguments(parser: argparse.ArgumentParser, exclude: Iterable[str] = (),
                           default_text: dict[str, str] | None = None) -> None:
    """One flag per setting (in the schema's groups); ``default_text`` rewrites a default's help."""
    skip = set(exclude)
    default_text = default_text or {}
    for group, title in GROUPS.items():
        g = parser.add_argument_group(title or "run settings")
        for name, kind, default, sp in specs(group):
            if name in skip:
                continue
            flags = [_flag(name, sp), *sp.aliases]
            common = dict(dest=_PREFIX + name, default=argparse.SUPPRESS,
                          help=_help(name, kind, sp, default, default_text.get(name)))
            if kind is bool:
                g.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            elif sp.choices is not None:
                g.add_argument(*flags, choices=sp.choices, **common)
            else:
                g.add_argument(*flags, type=_typed(kind, sp.auto is not None),
                               metavar="N" if kind is int else "X", **common)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (name -> value), nothing else."""
    return {k[len(_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_PREFIX)}


def settings_from_args(args: argparse.Namespace, **defaults: Any) -> RunSettings:
    """RunSettings of the given flags over ``defaults`` over the schema's; SettingsError if out of range."""
    return DEFAULTS.replace(**{**defaults, **given_settings(args)}).validate()


def settings_error_text(exc: SettingsError) -> str:
    return f"{_flag(exc.name, spec(exc.name))}: {exc}"
