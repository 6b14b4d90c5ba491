"""Names shared by core and the app, torch-free so the app can import them without the ML stack."""
from __future__ import annotations

__all__ = ["STAGES", "CROP_MODES", "PRECISIONS", "FIND_THRESHOLD", "REFINE_OPTIONS", "FEW_CLUSTERS",
           "TO_CORRECT_COUNT", "KEEP_PREDICTION", "NOT_NAMED"]

# Pipeline stages in the order StegoPipeline.fit runs them ("crf" only with CRF on).
STAGES: tuple[str, ...] = ("features", "knn", "training", "clustering", "segments", "crf")
# Feature extraction crops: the whole image, or its five crops (training corpus only).
CROP_MODES: tuple[str, ...] = ("none", "five")
# Backbone compute precisions ("auto" = bfloat16 on CPUs with native bf16, else float32).
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
# Click-to-find: similarity at or above which a location belongs to a found region. Chosen on
# CamVid train (bench/results/find_train_s0_sweep.md): at 0.6 one click on a pole covered a
# third of the corpus; 0.9 keeps what looks alike and gave the best pseudo-labels; confirmed on val.
FIND_THRESHOLD: float = 0.9
# Automatic shifts: runs of at most this many clusters (about the classes) let the random pairs attract more, runs
# with more (over-clustered for a person to name) fewer (core.shifts.auto_neg_factor). Chosen on CamVid train,
# confirmed on val (docs/shifts.md, "Few clusters or many").
FEW_CLUSTERS: int = 32
# Images to correct first (core.selection, stego_app.to_correct): how many `app.py label RUN to-correct` lists.
TO_CORRECT_COUNT: int = 10
# Refine with names, what a person may set when starting it: field -> (label, help); the Clusters tab and
# `app.py label RUN refine` are built from it (defaults: core.refinement.RefineConfig).
REFINE_OPTIONS: dict[str, tuple[str, str]] = {
    "steps": ("Classifier training steps", "training steps of the pixel classifier"),
    "dense": ("Finer maps (slower)", "predict on a token grid twice as dense, so thin things (poles, signs, "
              "distant people) get tokens of their own; four extra backbone passes per image"),
}
# Values of a refinement's override maps (core.refinement.refine) besides cluster indices: no
# correction at this pixel, the prediction stays; or a person left the pixel out of every named
# label (a corrected image's uncovered pixels), so the prediction stays among the classes that
# are not named labels.
KEEP_PREDICTION = -1
NOT_NAMED = -2
