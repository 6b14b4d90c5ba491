"""The run settings schema: every hyper-parameter a person can set, with its default, limits and help.

One home for each setting. The CLI flags (``app.py run``, ``app.py evaluate``), the Discover
tab's form and the stored runs are all built from :class:`RunSettings`; core's configs
(``FeatureConfig``, ``TrainConfig``, ``PipelineConfig``) take their defaults from it and check
their shared fields with :func:`check`. Torch-free: the app imports it without the ML stack.

    s = RunSettings.parse({"resolution": "448", "steps": ""})   # blank = default / automatic
    s.validate()                                                # SettingsError names the field
    s.overrides()                                               # what differs from the defaults
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from core.clustering import DEFAULT_ALPHA
from core.constants import CROP_MODES, FEW_CLUSTERS

__all__ = ["Spec", "RunSettings", "SettingsError", "DEFAULTS", "GROUPS", "specs", "spec", "check",
           "auto_steps", "AUTO_STEPS_PER_ITEM", "AUTO_STEPS_MIN", "AUTO_STEPS_MAX", "AUTO_STEPS_HELP"]

# Automatic training length: a first look at 10 images needs few steps (about a minute on a
# 2-core CPU); a corpus of a few hundred images gets the paper's 2000 (CamVid train: 367 -> 2000).
AUTO_STEPS_PER_ITEM, AUTO_STEPS_MIN, AUTO_STEPS_MAX = 6, 50, 2000
AUTO_STEPS_HELP = (f"empty = automatic: {AUTO_STEPS_PER_ITEM} per training item (image, or crop with five "
                   f"crops), between {AUTO_STEPS_MIN} and {AUTO_STEPS_MAX}")


def auto_steps(n_items: int) -> int:
    """Training steps chosen for ``n_items`` training items (images, or 5 per image with five crops)."""
    return int(min(AUTO_STEPS_MAX, max(AUTO_STEPS_MIN, AUTO_STEPS_PER_ITEM * int(n_items))))


# The groups the form shows, in order (key -> heading).
GROUPS: dict[str, str] = {
    "basic": "",
    "training": "Advanced: STEGO hyper-parameters",
    "loss": "Loss shifts and weights",
}


class SettingsError(ValueError):
    """A setting out of its limits; ``name`` is the field, the message says what is allowed."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Spec:
    """What a setting is: label, help, limits; ``auto`` says what an empty value (None) means."""

    label: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False              # minimum and maximum themselves are not allowed
    choices: tuple[str, ...] | None = None
    choice_labels: tuple[str, ...] | None = None   # how a form shows the choices
    auto: str | None = None              # None allowed: what the pipeline does then
    group: str = "basic"
    flag: str | None = None              # CLI flag (default --name-with-dashes)
    aliases: tuple[str, ...] = ()

    def limits_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"{'between' if not self.exclusive else 'strictly between'} {_num(lo)} and {_num(hi)}"
        if lo is not None:
            return f"{'>' if self.exclusive else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if self.exclusive else '<='} {_num(hi)}"
        return ""


def _num(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"


def _setting(default: Any, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(**spec)})


@dataclass
class RunSettings:
    """Every hyper-parameter of a discovery run (stored with the run; defaults are the product's)."""

    backbone: str | None = _setting(
        None, label="Backbone", help="frozen DINO / DINOv2 feature extractor",
        auto="the best one whose weights are available")
    resolution: int = _setting(
        322, label="Resolution (short side, px)", minimum=28, maximum=2048,
        help="short image side the backbone sees; more finds smaller things and costs time (~quadratic)")
    n_clusters: int = _setting(
        88, label="Number of clusters", minimum=2, maximum=256, flag="--clusters", aliases=("--n-clusters",),
        help="clusters to discover; well above the classes you expect (over-clustering: name them, a group "
             "of similar ones at a time, afterwards)")
    crf: bool = _setting(
        False, label="Refine cluster edges with a CRF",
        help="sharpen the discovered clusters' edges with a dense CRF (its cost grows with the clusters: "
             "about 2 s per image at 88 on 2 CPU cores); Refine with names runs its own CRF over the named "
             "classes either way")
    steps: int | None = _setting(
        None, label="Training steps", minimum=0, maximum=1_000_000, group="training", help="head training steps",
        auto=f"{AUTO_STEPS_PER_ITEM} per training item, between {AUTO_STEPS_MIN} and {AUTO_STEPS_MAX}")
    batch_size: int = _setting(16, label="Batch size", minimum=1, maximum=4096, group="training",
                               help="images per training step")
    code_dim: int = _setting(70, label="Code dimension", minimum=2, maximum=4096, group="training",
                             help="size of the segmentation head's codes")
    lr: float = _setting(5e-4, label="Learning rate", minimum=0, maximum=1, exclusive=True, group="training",
                         help="Adam learning rate of the head")
    crop_mode: str = _setting("none", label="Crop mode", choices=CROP_MODES, choice_labels=("whole image", "five crops"),
                              group="training",
                              help="train on whole images, or on five crops of each (4 corners + centre)")
    flip: bool = _setting(False, label="Average with the flipped image", group="training",
                          help="average codes with the mirrored image (doubles feature time; on CamVid it cost "
                               "about 5 mIoU on frames the run was not fitted on)")
    seed: int = _setting(0, label="Seed", minimum=0, maximum=2**31 - 1, group="training",
                         help="random seed of training and k-means")
    crf_resolution: int | None = _setting(
        None, label="CRF resolution (short side, px)", minimum=0, maximum=16384, group="training",
        help="short side the CRF runs at; 0 = each image's full size (slow on large photos)",
        auto="the features' resolution (the paper's choice, fast)")
    alpha: float = _setting(DEFAULT_ALPHA, label="Cluster temperature", minimum=0, maximum=100, exclusive=True,
                            group="training", help="softmax temperature of the cluster probabilities on cosine "
                                                   "similarity (sharper with more)")
    shift_self: float | None = _setting(None, label="Shift (self)", minimum=-1, maximum=1, group="loss",
                                        help="correlation shift of the self pairs", auto="from feature statistics")
    shift_knn: float | None = _setting(None, label="Shift (KNN)", minimum=-1, maximum=1, group="loss",
                                       help="correlation shift of the KNN pairs", auto="from feature statistics")
    shift_neg: float | None = _setting(None, label="Shift (negative)", minimum=-1, maximum=1, group="loss",
                                       help="correlation shift of the random pairs",
                                       auto=f"from feature statistics (attracting more in runs of at most "
                                            f"{FEW_CLUSTERS} clusters, fewer above)")
    weight_self: float = _setting(0.67, label="Weight (self)", minimum=0, maximum=100, group="loss",
                                  help="loss weight of the self pairs")
    weight_knn: float = _setting(0.25, label="Weight (KNN)", minimum=0, maximum=100, group="loss",
                                 help="loss weight of the KNN pairs")
    weight_neg: float = _setting(0.63, label="Weight (negative)", minimum=0, maximum=100, group="loss",
                                 help="loss weight of the random pairs")

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RunSettings":
        """Stored settings (unknown keys are ignored, missing ones take today's defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> "RunSettings":
        """Settings from loosely typed values (form fields, text): blank or "auto" = the default.

        Integers are rounded from floats (a number box gives floats); a value that is not a
        number raises SettingsError naming the field. Keys that are not settings are ignored.
        """
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name not in _FIELDS:
                continue
            kwargs[name] = _coerce(name, value)
        return cls(**kwargs)

    def overrides(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        return {k: v for k, v in self.to_dict().items() if v != getattr(DEFAULTS, k)}

    def replace(self, **changes: Any) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunSettings":
        """Raise SettingsError for the first value outside its limits; returns self."""
        for name, _, _, _ in specs():
            check(name, getattr(self, name))
        if self.backbone is not None:
            from core.registry import list_backbones

            if self.backbone not in list_backbones():
                raise SettingsError("backbone", f"unknown backbone {self.backbone!r}; choose one of "
                                                f"{', '.join(list_backbones())}")
        return self


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunSettings)}
DEFAULTS = RunSettings()


def _kind(name: str) -> type:
    """int, float, bool or str: the declared type without ``| None``."""
    text = str(_FIELDS[name].type).replace(" ", "").replace("|None", "")
    return {"int": int, "float": float, "bool": bool, "str": str}[text]


def specs(group: str | None = None) -> Iterator[tuple[str, type, Any, Spec]]:
    """(name, kind, default, Spec) of every setting (of one group), in form order."""
    for f in dataclasses.fields(RunSettings):
        sp: Spec = f.metadata["spec"]
        if group is None or sp.group == group:
            yield f.name, _kind(f.name), f.default, sp


def spec(name: str) -> Spec:
    return _FIELDS[name].metadata["spec"]


def _coerce(name: str, value: Any) -> Any:
    kind, sp = _kind(name), spec(name)
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in ("auto", "default", "none"):
            value = None
    if value is None:
        return None if sp.auto is not None else getattr(DEFAULTS, name)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return int(round(number))
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(name, f"{sp.label}: {value!r} is not "
                                  f"{'a whole number' if kind is int else 'a number' if kind is float else 'yes/no'}"
                            ) from None


def check(name: str, value: Any) -> None:
    """Raise SettingsError unless ``value`` is allowed for setting ``name``."""
    kind, sp = _kind(name), spec(name)
    if value is None:
        if sp.auto is None:
            raise SettingsError(name, f"{sp.label} needs a value")
        return
    if sp.choices is not None:
        if value not in sp.choices:
            raise SettingsError(name, f"{sp.label} {value!r} must be {sp.limits_text()}")
        return
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingsError(name, f"{sp.label} {value!r} is not a number")
        if kind is int and int(value) != value:
            raise SettingsError(name, f"{sp.label} {value!r} must be a whole number")
        lo, hi = sp.minimum, sp.maximum
        low_bad = lo is not None and (value <= lo if sp.exclusive else value < lo)
        high_bad = hi is not None and (value >= hi if sp.exclusive else value > hi)
        if low_bad or high_bad:
            raise SettingsError(name, f"{sp.label} {_num(value)} must be {sp.limits_text()}")
