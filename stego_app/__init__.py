"""stego_app: persistence, services, UI and CLI around the core STEGO library.

The UI and the CLI call only the service modules (projects, ingest, runs, labels,
export); see docs/DESIGN.md, section "stego_app contracts".
"""
from stego_app.errors import NotFound, UserError

__all__ = ["NotFound", "UserError"]
