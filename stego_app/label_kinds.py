"""Thing or stuff, per label.

A *thing* is a countable object (car, person): exports give one annotation per connected
region and panoptic gives each its own segment. *Stuff* is a region (sky, road): one
annotation and one panoptic segment per image. A person chooses per label (stored in
Label.isthing); until then the kind is guessed from the name: names of countable objects
(COCO's 80 thing classes, Cityscapes' and CamVid's object classes, a few more) are
things, everything else is stuff.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from stego_app import edit_versions
from stego_app.db import lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import Cluster, Label, Run

KINDS = ("thing", "stuff", "auto")      # auto = guessed from the name

THING_NAMES = frozenset("""
person people pedestrian rider man woman child human bicyclist cyclist motorcyclist
bicycle bike car truck bus train motorcycle motorbike airplane aeroplane plane boat ship
vehicle van caravan trailer tram suv taxi scooter
traffic light stop sign parking meter bench bird cat dog horse sheep cow elephant bear
zebra giraffe animal backpack umbrella handbag tie suitcase frisbee skis snowboard ball
kite bat glove skateboard surfboard racket bottle cup fork knife spoon bowl banana
apple sandwich orange broccoli carrot hotdog pizza donut cake chair couch sofa bed
table toilet tv monitor laptop mouse remote keyboard phone microwave oven toaster sink
refrigerator fridge book clock vase scissors teddy hair drier toothbrush
signsymbol sign cone lamp hydrant box bag
""".split())
# Multi-word COCO names whose last word alone would be read as stuff (or be ambiguous).
_THING_PHRASES = frozenset({"traffic light", "fire hydrant", "stop sign", "parking meter",
                            "sports ball", "baseball bat", "baseball glove", "tennis racket",
                            "wine glass", "hot dog", "potted plant", "dining table",
                            "cell phone", "teddy bear", "hair drier", "traffic sign"})
# Names that end in a thing word but mean a region.
_STUFF_PHRASES = frozenset({"car park", "parking lot", "bus stop", "train track", "railway track"})


def _singular(word: str) -> str:
    if word in ("people", "bus", "glass", "grass"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def guess_isthing(name: str) -> bool:
    """Whether a label name obviously names countable objects (else: stuff)."""
    words = [_singular(w) for w in "".join(ch if ch.isalnum() else " " for ch in name.lower()).split()]
    if not words:
        return False
    phrase = " ".join(words)
    if phrase in _STUFF_PHRASES:
        return False
    if phrase in _THING_PHRASES or "".join(words) in THING_NAMES:
        return True
    return words[-1] in THING_NAMES


@dataclass(frozen=True)
class LabelKind:
    label_id: int
    name: str
    isthing: bool
    guessed: bool                    # True: no person chose it; follows the name

    @property
    def kind(self) -> str:
        return "thing" if self.isthing else "stuff"


def _kind(label: Label) -> LabelKind:
    guessed = label.isthing is None
    return LabelKind(label.id, label.name, guess_isthing(label.name) if guessed else bool(label.isthing),
                     guessed)


def label_kinds(ctx, run_id: int) -> list[LabelKind]:
    """Every label of the run with its kind, by name."""
    with ctx.db.read() as s:
        if s.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        rows = s.scalars(select(Label).join(Cluster, Cluster.label_id == Label.id)
                         .where(Label.run_id == run_id).distinct()).all()      # not those kept for corrections
        return sorted((_kind(lab) for lab in rows), key=lambda k: k.name.lower())


def set_label_kind(ctx, run_id: int, label_name: str, kind: str) -> list[LabelKind]:
    """Mark a label as 'thing' or 'stuff', or 'auto' (guess from the name again)."""
    kind = (kind or "").strip().lower()
    if kind not in KINDS:
        raise UserError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    wanted = " ".join((label_name or "").split()).lower()
    with ctx.db.write() as s:
        run = lock_for_update(s, Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        edit_versions.check(run_id, run.mapping_version)      # a stale page's edit is refused
        label = next((lab for lab in s.scalars(select(Label).where(Label.run_id == run_id))
                      if lab.name.lower() == wanted), None)
        if label is None:
            raise NotFound(f"run {run_id} has no label named {label_name!r}")
        label.isthing = None if kind == "auto" else kind == "thing"
        run.mapping_version += 1            # exports record the mapping they were made from
    return label_kinds(ctx, run_id)
