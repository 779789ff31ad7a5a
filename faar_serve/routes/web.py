"""The web page at ``/``: upload an image, see every map; a client of the public API only.

Decisions:

* One static page (``faar_serve/static/index.html``, ``app.js``, ``style.css``, ``sample.png``), no
  build step, no framework, no external URL: it ships in the wheel (package data) and works
  offline. A Content-Security-Policy of ``'self'`` (plus ``data:``/``blob:`` images) makes the
  browser refuse anything else, so an accidental CDN link fails in the browser test.
* It calls only ``GET v1/model`` and ``POST v1/predict`` (multipart field ``image``, JSON
  answer), with URLs relative to the page, so it also works behind a path prefix and reads
  as living documentation of the API (it shows the equivalent ``curl`` and the answer).
* The page and its files are public; the API calls carry the key. When ``v1/model`` answers
  401 the page asks for the key and sends it as ``Authorization: Bearer``, kept in
  sessionStorage (gone with the tab).
* Maps are drawn from the answer alone: label maps are shown as the palette PNGs they are,
  with a legend of ``classes``/``palette``; normals as their RGB PNG; probability maps
  (saliency, edge) in a heat colour map, depth in another between the answer's ``min`` and
  ``max`` with a colour bar in its ``units``. Every map has the upload's size, as the API
  promises; the test checks it.
* Every PNG is also decoded in the page (a small decoder on the browser's
  ``DecompressionStream``), because a canvas reads 16-bit depth as 8 bits (26 cm steps) and a
  palette map as colours: pointing at any picture reads every map at that pixel in its own
  terms (class name, probability, metres, normal vector), which the test compares with the
  API's exact ``format=npz`` arrays.
* The overlay tile draws the chosen map over the photo with an opacity slider.
* ``sample.png`` is a generated scene (``docs/make_screenshot.py --sample`` rewrites it).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parents[1] / "static"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

router = APIRouter(tags=["web page"])


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The page; its script and styles are under ``/static``."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """``/static``: the page's script, styles and sample image, mounted by ``create_app``."""
    return StaticFiles(directory=STATIC_DIR)
