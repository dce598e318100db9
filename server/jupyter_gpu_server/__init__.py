"""Jupyter Server extension behind the jupyter-gpu Lab sidebar: a small authenticated REST
API over the same daemon the ``%%gpu`` magic uses (same configuration, same client)."""

from __future__ import annotations

from typing import Any

from jupyter_gpu import __version__


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "jupyter_gpu_server"}]


def _jupyter_labextension_paths() -> list[dict]:
    return [{"src": "labextension", "dest": "jupyter-gpu"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_gpu_server.handlers import setup_handlers

    setup_handlers(serverapp)
    serverapp.log.info("jupyter-gpu %s: REST API under %sjupyter-gpu/api/", __version__, serverapp.base_url)


def _unload_jupyter_server_extension(serverapp: Any) -> None:
    link = serverapp.web_app.settings.get("jupyter_gpu_link")
    if link is not None:
        link.disconnect()
