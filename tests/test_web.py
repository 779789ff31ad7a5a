"""The web page at ``/``: served as files, and used in a real headless Chromium.

The browser tests drive Debian's ``chromium`` through its ``chromium-driver`` with Selenium;
the driver's path is given explicitly, so Selenium Manager never reaches for the network.
Where Chromium or its driver is missing they skip, naming the apt packages (``make test``
installs them where apt-get works). The gateway is the real one (``live_gateway``) on the tiny
exported model (64x64), and uploads have other sizes, so every map must come back resized.
Artifact: the page after an upload, ``out/test-artifacts/web.png``.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import LiveServer, ServeApp, encode, image, load_npz, manifest, post_image, settings

from faar_serve.app import create_app
from faar_serve.routes.web import STATIC_DIR

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "out" / "test-artifacts"
WAIT_S = 20
SIZE = (80, 96)  # height, width of the upload; the model's input is 64x64


def test_page_and_files_are_public_and_self_contained(repo: Path) -> None:
    with TestClient(create_app(settings(repo, api_key="s3cret"))) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("app.js", "style.css", "sample.png"):
            assert client.get(f"/static/{name}").status_code == 200, name
        assert client.get("/v1/model").status_code == 401  # the API keeps its key; the page needs none
        assert "/" not in client.get("/openapi.json").json()["paths"]
    for path in STATIC_DIR.glob("*.[hjc]*"):  # html, js, css: nothing from another origin
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|url\(\s*[\"']?(https?:)?//|import\s.*//",
                             path.read_text()), path


def test_sample_is_the_documented_scene() -> None:
    spec = importlib.util.spec_from_file_location("make_screenshot", ROOT / "docs" / "make_screenshot.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from faar.data.scenes import render_scene

    want = render_scene(script.SAMPLE_SEED, script.SAMPLE_SIZE)["image"]
    np.testing.assert_array_equal(np.asarray(Image.open(STATIC_DIR / "sample.png").convert("RGB")), want)


# --- in Chromium -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no headless Chromium: apt-get install chromium chromium-driver (`make chromium`)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def state(driver: Any) -> str:
    return driver.execute_script("return document.body.dataset.state || ''")


def wait_state(driver: Any, *states: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: state(d) in states, f"page never reached {states}")
    return state(driver)


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_state(driver, "idle", "error")


def act(driver: Any, action: Any, ends: tuple[str, ...] = ("done", "error")) -> str:
    """Run ``action`` (an upload, a click) and wait for the page to settle in one of ``ends``."""
    driver.execute_script("document.body.dataset.state = 'pending'")
    action()
    return wait_state(driver, *ends)


def upload(driver: Any, path: Path) -> str:
    return act(driver, lambda: driver.find_element("id", "file").send_keys(str(path)))


def map_sizes(driver: Any) -> dict[str, list[int]]:
    """task -> [width, height] of its image (natural size) or canvas (pixel size)."""
    return driver.execute_script("""
        return Object.fromEntries([...document.querySelectorAll('.map')].map((el) => [el.dataset.task,
            el.tagName === 'IMG' ? [el.naturalWidth, el.naturalHeight] : [el.width, el.height]]));""")


def text(driver: Any, selector: str) -> str:
    return driver.find_element("css selector", selector).text


def error_text(driver: Any) -> str:
    box = driver.find_element("id", "error")
    return box.text if box.is_displayed() else ""


def test_upload_renders_every_map(browser: Any, live_gateway: LiveServer, repo: Path, tmp_path: Path) -> None:
    meta = manifest(repo)
    open_page(browser, live_gateway.url)
    assert f"model {meta['model']['name']} v{meta['model']['version']}" in text(browser, "#model")
    height, width = SIZE
    path = tmp_path / "photo.png"
    path.write_bytes(encode(image(3, height, width)))
    assert upload(browser, path) == "done", error_text(browser)

    assert map_sizes(browser) == {task: [width, height] for task in meta["tasks"]}
    for task, entry in meta["tasks"].items():
        tile = f"[data-tile='{task}']"
        if entry["kind"] == "labels":
            names = [e.text for e in browser.find_elements("css selector", f"{tile} .legend .name")]
            assert names == entry["classes"], task
    depth = text(browser, "[data-tile='depth'] .colourbar")
    assert len(re.findall(r"\d+\.\d\d m\b", depth)) == 3 and "metres" in depth, depth
    assert "1" in text(browser, "[data-tile='saliency'] .colourbar")
    overlay = browser.execute_script("const c = document.getElementById('overlay'); return [c.width, c.height]")
    assert overlay == [width, height]
    timings = text(browser, "#timings")
    for stage in ("decode", "resize", "queue", "inference", "encode", "round trip"):
        assert stage in timings, timings
    assert "/v1/predict" in browser.execute_script("return document.getElementById('call').textContent")
    assert not error_text(browser)
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems  # no script error, nothing refused by the Content-Security-Policy

    check_readout(browser, live_gateway, path.read_bytes(), meta)

    slider = browser.find_element("id", "opacity")
    slider.send_keys("\ue012" * 10)  # arrow left, ten times
    assert slider.get_attribute("value") == "40"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = browser.get_window_size()
    browser.set_window_size(size["width"], browser.execute_script(
        "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"))
    browser.save_screenshot(str(ARTIFACTS / "web.png"))  # the whole page
    browser.set_window_size(size["width"], size["height"])


def expected_reading(entry: dict[str, Any], arr: np.ndarray, x: int, y: int) -> str:
    """What the page must print for pixel (x, y) of an exact map: the PNG's value, read as the API says."""
    if entry["kind"] == "labels":
        return entry["classes"][arr[y, x]]
    if entry["kind"] == "normals":
        return "(" + ", ".join(f"{np.round((n + 1) * 127.5) / 255 * 2 - 1:.2f}" for n in arr[:, y, x]) + ")"
    if entry["kind"] == "depth":
        return f"{np.round(arr[y, x] / 0.001) / 1000:.3f} {entry['units']}"
    return f"{np.round(np.clip(arr[y, x], 0, 1) * 255) / 255:.3f}"


def check_readout(driver: Any, server: LiveServer, data: bytes, meta: dict[str, Any]) -> None:
    """Point at pixels of the depth map: the readout must match the API's exact arrays (format=npz)."""
    from selenium.webdriver.common.action_chains import ActionChains

    exact = load_npz(httpx.post(f"{server.url}/v1/predict?format=npz&precision=float32", files=post_image(data),
                                timeout=30).content)
    target = driver.find_element("css selector", ".map[data-task='depth']")
    shown_w, shown_h = target.size["width"], target.size["height"]
    height, width = exact["depth"].shape
    for x, y in ((0, 0), (width // 3, height // 2), (width - 1, height - 1)):
        # the centre of pixel (x, y) on screen, as an offset from the element's centre
        dx = round((x + 0.5) * shown_w / width - shown_w / 2)
        dy = round((y + 0.5) * shown_h / height - shown_h / 2)
        ActionChains(driver).move_to_element_with_offset(target, dx, dy).perform()
        want = f"at ({x}, {y}): " + " · ".join(f"{task} {expected_reading(entry, exact[task], x, y)}"
                                                 for task, entry in meta["tasks"].items())
        assert text(driver, "#probe") == want


def test_sample_button(browser: Any, live_gateway: LiveServer, repo: Path) -> None:
    open_page(browser, live_gateway.url)
    assert act(browser, browser.find_element("id", "sample").click) == "done", error_text(browser)
    width, height = Image.open(STATIC_DIR / "sample.png").size
    assert map_sizes(browser) == {task: [width, height] for task in manifest(repo)["tasks"]}


def test_invalid_upload_shows_the_api_error(browser: Any, live_gateway: LiveServer, tmp_path: Path) -> None:
    open_page(browser, live_gateway.url)
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels\n")
    assert upload(browser, fake) == "error"
    message = error_text(browser)
    assert "415" in message and "not an image in a supported format" in message, message
    assert not browser.find_element("id", "results").is_displayed()

    good = tmp_path / "photo.png"
    good.write_bytes(encode(image(4, 40, 50)))
    assert upload(browser, good) == "done", error_text(browser)  # the page is still usable
    assert not error_text(browser)
    assert set(map(tuple, map_sizes(browser).values())) == {(50, 40)}


def test_oversized_upload_shows_413(browser: Any, repo: Path, tmp_path: Path, live_server: ServeApp) -> None:
    limit = 4096
    big = tmp_path / "big.png"
    big.write_bytes(encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert big.stat().st_size > 2 * limit
    live = live_server(create_app(settings(repo, max_upload_bytes=limit)))
    open_page(browser, live.url)
    assert upload(browser, big) == "error"
    message = error_text(browser)
    assert "413" in message and f"over the limit of {limit} bytes" in message, message


def test_api_key_prompt(browser: Any, repo: Path, tmp_path: Path, live_server: ServeApp) -> None:
    live = live_server(create_app(settings(repo, api_key="s3cret")))
    open_page(browser, live.url)
    assert "401" in error_text(browser)
    form = browser.find_element("id", "key-form")
    assert form.is_displayed()
    for key, ending in (("wrong", "error"), ("s3cret", "idle")):
        field = browser.find_element("id", "key")
        field.clear()
        field.send_keys(key)
        button = form.find_element("css selector", "button")
        assert act(browser, button.click, ("idle", "error")) == ending, error_text(browser)
    assert not form.is_displayed() and "model faar" in text(browser, "#model")
    path = tmp_path / "photo.png"
    path.write_bytes(encode(image(5, 48, 48)))
    assert upload(browser, path) == "done", error_text(browser)  # the key goes with the upload too


def test_docs_render_from_local_files(browser: Any, live_gateway: LiveServer) -> None:
    """Swagger UI at /docs draws every operation with no network beyond the gateway (no CDN)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_gateway.url + "/docs")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements("css selector", ".opblock-summary-path"),
                                         "Swagger UI drew no operation")
    paths = {e.get_attribute("data-path") for e in browser.find_elements("css selector", ".opblock-summary-path")}
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/metrics"} <= paths
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert loaded and all(url.startswith(live_gateway.url) for url in loaded), loaded
