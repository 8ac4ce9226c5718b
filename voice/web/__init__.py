"""The browser page: a Realtime API client served at `/` (plain HTML and JavaScript, no
build step), the reference client of `/v1/realtime`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

HERE = Path(__file__).parent
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(HERE / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        path = HERE / name
        # Only the page's own files, by name: no path reaches outside this folder.
        if "/" in name or path.suffix not in TYPES or not path.is_file():
            raise HTTPException(404, f"no such file: /web/{name}")
        return FileResponse(path, media_type=TYPES[path.suffix])
