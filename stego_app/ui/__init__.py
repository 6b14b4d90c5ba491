"""The browser app (Gradio), one module per tab.

- stego_app.ui.app: build_ui(ctx) -> gr.Blocks: the header, the tabs and the events between them
- stego_app.ui.project / discover / clusters / explore / export: each tab's components,
  view builders and handlers
- stego_app.ui.common: the error guard and helpers every tab uses
- stego_app.ui.formatting: pure formatting of service dataclasses (no Gradio)

`launch(ctx)` serves it. Gradio is imported only when the app is built, so
stego_app.ui.formatting stays importable without it.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def allowed_paths(ctx) -> list[str]:
    """Folders the browser may fetch files from: gallery thumbnails and offered downloads.

    (Original images never leave the server as files: galleries show cached thumbnails
    and the Explore tab sends downscaled arrays.)
    """
    cfg = ctx.config
    return [str(Path(p)) for p in (cfg.thumbs_dir, cfg.downloads_dir)]   # never exports_dir: guessable


def blocked_paths(ctx) -> list[str]:
    cfg = ctx.config
    return [str(cfg.data_dir / "stego.db"), str(cfg.cache_dir or cfg.data_dir / "cache"),
            str(cfg.exports_dir), str(cfg.images_dir)]


def launch(ctx, host: str | None = None, port: int | None = None,
           auth: tuple[str, str] | None = None, **kwargs) -> None:
    """Serve the app (blocking) on host:port, by default the AppConfig's (127.0.0.1:7860).

    `auth` ("user", "password"), by default AppConfig.auth, asks for a login first.
    """
    from stego_app.ui.app import build_ui

    cfg = ctx.config
    host = host or cfg.host
    port = port or cfg.port
    auth = auth if auth is not None else cfg.auth
    demo = build_ui(ctx)
    demo.queue(default_concurrency_limit=4)
    log.info("serving the app on http://%s:%s%s", host, port, " (login required)" if auth else "")
    demo.launch(server_name=host, server_port=port, auth=auth, show_error=True, show_api=False,
                allowed_paths=allowed_paths(ctx), blocked_paths=blocked_paths(ctx),
                max_file_size=cfg.max_upload_bytes, ssr_mode=False, inbrowser=False,
                auth_message="STEGO class discovery: please log in." if auth else None, **kwargs)
