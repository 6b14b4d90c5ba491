#!/usr/bin/env python3
"""STEGO labeler: discover segmentation classes in an image corpus without labels.

`python app.py` serves the browser app on 127.0.0.1:7860; `python app.py --help` lists
the subcommands (ingest, run, status, label, export, evaluate) for scripting.
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from stego_app.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
