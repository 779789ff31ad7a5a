"""The README's picture of the web page (``docs/web.png``) and the page's sample scene.

    python docs/make_screenshot.py model_repository            # docs/web.png after "Sample scene"
    python docs/make_screenshot.py model_repository --sample   # first rewrite faar_serve/static/sample.png

The screenshot is of the real gateway (``python -m faar_serve`` on a free port) in Debian's
headless Chromium driven by Selenium (``apt-get install chromium chromium-driver``;
``selenium`` is in the ``dev`` extra). Use the trained demo model (``make demo``): a random
one draws noise. The sample is generated scene ``SAMPLE_SEED`` at ``SAMPLE_SIZE``, so it can
be rebuilt bit for bit instead of being an unexplained binary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image

from faar.data.scenes import render_scene

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "faar_serve" / "static" / "sample.png"
SAMPLE_SEED = 4  # sky, ground, a cone, a box and a figure: most classes and parts in one picture
SAMPLE_SIZE = (192, 256)  # height, width: not the model's size, so the page shows maps resized back
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--hide-scrollbars")


def write_sample(path: Path = SAMPLE) -> None:
    Image.fromarray(render_scene(SAMPLE_SEED, SAMPLE_SIZE)["image"]).save(path, optimize=True)


def screenshot(repo: Path, out: Path, model: str = "faar") -> None:
    """Serve ``repo``, press "Sample scene", wait for the maps, save the whole page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    from faar_serve.net import free_port, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "faar_serve", "--model-repository", str(repo), "--model", model,
                               "--port", str(port), "--log-level", "warning"])
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    driver = None
    try:
        wait_ready(url, server)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.execute_script("return document.body.dataset.state") == "idle")
        driver.find_element("id", "sample").click()
        wait.until(lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
        photo = driver.find_element("css selector", "[data-tile='photo'] img")  # point at the box: the readout
        ActionChains(driver).move_to_element_with_offset(photo, photo.size["width"] // 5, photo.size["height"] // 10
                                                         ).perform()
        height = driver.execute_script("return document.documentElement.scrollHeight "
                                       "+ window.outerHeight - window.innerHeight")
        driver.set_window_size(1280, height)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="model repository written by faar-export")
    parser.add_argument("--model", default="faar")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "web.png")
    parser.add_argument("--sample", action="store_true", help=f"first rewrite {SAMPLE.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.sample:
        write_sample()
    screenshot(args.repo, args.out, args.model)
    print(args.out)


if __name__ == "__main__":
    main()
