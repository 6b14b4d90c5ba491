"""The run settings schema: one default, one set of limits, used by the CLI, the form, evaluate and core."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from core.settings import DEFAULTS, RunSettings, SettingsError, auto_steps, spec, specs
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_parser() -> argparse.ArgumentParser:
    from stego_app.cli import build_parser

    return build_parser()


def test_core_configs_take_their_defaults_from_the_schema():
    from core.features import FeatureConfig
    from core.pipeline import PipelineConfig
    from core.training import TrainConfig

    f, t, p = FeatureConfig(), TrainConfig(), PipelineConfig()
    assert (f.resolution, f.flip, f.crop_mode) == (DEFAULTS.resolution, DEFAULTS.flip, DEFAULTS.crop_mode)
    assert (t.code_dim, t.batch_size, t.lr, t.seed) == (DEFAULTS.code_dim, DEFAULTS.batch_size, DEFAULTS.lr,
                                                        DEFAULTS.seed)
    assert (t.weight_self, t.weight_knn, t.weight_neg) == (DEFAULTS.weight_self, DEFAULTS.weight_knn,
                                                           DEFAULTS.weight_neg)
    assert (p.n_clusters, p.crf, p.crf_resolution, p.alpha) == (DEFAULTS.n_clusters, DEFAULTS.crf,
                                                                DEFAULTS.crf_resolution, DEFAULTS.alpha)
    # and check their shared fields with the schema's limits
    with pytest.raises(ValueError, match="n_clusters: Number of clusters 300 must be between 2 and 256"):
        PipelineConfig(n_clusters=300).validate()
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=0).validate()


def test_from_settings_builds_the_pipeline_of_a_run():
    from core.pipeline import PipelineConfig

    s = RunSettings(resolution=448, n_clusters=44, flip=True, code_dim=32, shift_self=0.2, alpha=3.0)
    cfg = PipelineConfig.from_settings(s, backbone="test_tiny", n_train_items=10, device="cpu", n_jobs=3)
    assert (cfg.features.resolution, cfg.features.flip, cfg.n_clusters, cfg.train.code_dim) == (448, True, 44, 32)
    assert cfg.train.shift_self == 0.2 and cfg.alpha == 3.0 and cfg.n_jobs == 3
    assert cfg.train.steps == auto_steps(10) == 60
    with pytest.raises(ValueError, match="n_train_items"):
        PipelineConfig.from_settings(s, backbone="test_tiny")


def test_validate_parse_and_overrides():
    assert RunSettings().validate() == DEFAULTS
    for bad, field in ((dict(n_clusters=1), "n_clusters"), (dict(resolution=4000), "resolution"),
                       (dict(lr=0.0), "lr"), (dict(crop_mode="ten"), "crop_mode"), (dict(weight_knn=-1), "weight_knn"),
                       (dict(backbone="resnet9000"), "backbone"), (dict(steps=2.5), "steps")):
        with pytest.raises(SettingsError) as exc:
            RunSettings(**bad).validate()
        assert exc.value.name == field
    s = RunSettings.parse({"resolution": "448.0", "steps": "", "shift_self": "auto", "flip": "yes",
                           "crf_resolution": " 0 ", "not_a_setting": 3})
    assert s.resolution == 448 and s.steps is None and s.shift_self is None and s.flip is True
    assert s.crf_resolution == 0
    assert s.overrides() == {"resolution": 448, "flip": True, "crf_resolution": 0}
    assert RunSettings.parse({"lr": ""}).lr == DEFAULTS.lr          # blank = default for a required value
    with pytest.raises(SettingsError, match="Batch size: 'lots' is not a whole number"):
        RunSettings.parse({"batch_size": "lots"})
    # stored settings of an older run (fewer keys, unknown ones) still load
    assert RunSettings.from_dict({"resolution": 224, "gone": 1}) == RunSettings(resolution=224)


def test_every_setting_is_a_flag_of_run_and_evaluate_with_the_schema_default_and_limits():
    from stego_app import evaluate_cli
    from stego_app.cli_settings import given_settings, settings_from_args

    parser = _run_parser()
    args = parser.parse_args(["run", "--project", "p"])
    assert settings_from_args(args) == DEFAULTS                   # nothing given: the schema's defaults
    args = parser.parse_args(["run", "--project", "p", "--clusters", "44", "--no-crf", "--flip", "--steps", "auto",
                              "--shift-knn", "0.1", "--crop-mode", "five"])
    assert given_settings(args) == {"n_clusters": 44, "crf": False, "flip": True, "steps": None,
                                    "shift_knn": 0.1, "crop_mode": "five"}
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["run"]._actions}
    for name, kind, default, sp in specs():
        if name == "backbone":            # run uses the common --backbone (the server's)
            continue
        text = helps["setting__" + name]
        assert sp.help in text, name
        if sp.minimum is not None and sp.maximum is not None:
            assert sp.limits_text() in text, name

    ev = argparse.ArgumentParser()
    evaluate_cli.add_arguments(ev)
    flags = {o for a in ev._actions for o in a.option_strings}
    for name, kind, default, sp in specs():
        assert (sp.flag or "--" + name.replace("_", "-")) in flags, name
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--project", "p", "--steps", "many"])


def test_the_discover_form_has_one_input_per_setting_with_the_schema_default(tmp_path):
    import gradio as gr

    from stego_app.config import AppConfig
    from stego_app.context import create_context
    from stego_app.ui.app import App
    from stego_app.ui.discover import FORM_FIELDS

    ctx = create_context(AppConfig(data_dir=tmp_path / "data", demo=False, worker=False))
    try:
        with gr.Blocks():
            app = App(ctx)
        form = app.discover.form
        assert tuple(form) == FORM_FIELDS == tuple(n for n, _, _, _ in specs())
        for name, kind, default, sp in specs():
            comp = form[name]
            assert comp.label == sp.label, name
            if name == "backbone" or sp.auto is not None:
                assert comp.value == ("" if default is None else str(default)), name
            else:
                assert comp.value == default, name
            if sp.minimum is not None and sp.maximum is not None and not sp.choices:
                assert sp.limits_text() in comp.info, name      # the limits are said next to the input
    finally:
        ctx.close()


def test_the_schema_loads_without_torch():
    code = "import sys, core.settings, stego_app.cli_settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_limits_are_written_the_way_people_read_them():
    assert spec("n_clusters").limits_text() == "between 2 and 256"
    assert spec("lr").limits_text() == "strictly between 0 and 1"
    assert spec("crop_mode").limits_text() == "one of none, five"
