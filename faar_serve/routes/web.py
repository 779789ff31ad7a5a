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
* ``/docs`` (Swagger UI) works offline too: FastAPI's default page loads Swagger UI from a
  CDN and is blank without the internet, so its files come from the ``swagger-ui-bundle-v2``
  package (Swagger UI 5's own dist folder as package data; version 5 because FastAPI writes
  OpenAPI 3.1, which Swagger UI 4 refuses to render), mounted at ``/static/swagger``, and
  the page is FastAPI's documented self-hosting recipe. Swagger UI starts from an inline
  script, so ``/docs`` carries no CSP; the page's strict CSP applies to ``/`` only. ReDoc
  (CDN only) is off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC_DIR = Path(__file__).parents[1] / "static"
SWAGGER = "/static/swagger"  # where swagger_ui_path is mounted
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

router = APIRouter(tags=["web page"])


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The page; its script and styles are under ``/static``."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI from local files (relative to the app's root path, so it works behind a prefix)."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} API",
                               swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png")


def static_files() -> StaticFiles:
    """``/static``: the page's script, styles and sample image, mounted by ``create_app``."""
    return StaticFiles(directory=STATIC_DIR)


def swagger_files() -> StaticFiles:
    """``/static/swagger``: Swagger UI's dist files from the swagger-ui-bundle package."""
    return StaticFiles(directory=str(swagger_ui_path))
