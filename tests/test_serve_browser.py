"""The page in a real browser: `serve` (tiny untrained models) in a child process, Debian's headless Chromium
driven by Selenium. Load the page, draw a sample, paint a mask and repair, upload a non-image, compress and
decompress an image (the same pixels as `decompress`), and 20 concurrent requests all answered.

Without chromium and chromium-driver these tests are skipped, except under CI (CI=true), where .ci/run
installs them and their absence is a failure."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_inputs import world  # noqa: F401  (tiny checkpoints of both stages, images, a .vqz)

from tools.browser import INSTALL, chromium, find_browser, serving
from tools.compress import main_decompress

WAIT = 60  # seconds for anything on the page (a busy 2-core CI machine)


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    with serving(["--prior", world["prior"], "--device", "cpu", "--temperature", "0.9", "--temperature_end", "1.3",
                  "--cfg_scale", "2"], env={"OMP_NUM_THREADS": "1"}) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def browser():
    try:
        import selenium  # noqa: F401
    except ImportError:
        found = None
    else:
        found = find_browser()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI: the browser tests need chromium, chromium-driver and selenium ({INSTALL})")
        pytest.skip(f"no chromium/chromium-driver/selenium here ({INSTALL})")
    with chromium() as driver:
        driver.set_script_timeout(WAIT)
        yield driver


def until(driver, script: str):
    """Poll a JavaScript expression until it is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))


def pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def page(server, browser):
    browser.get(server)
    until(browser, "document.body.dataset.ready")
    return browser


def tab(driver, name: str) -> None:
    driver.find_element("css selector", f"[data-tab={name}]").click()


def test_the_sample_form_starts_at_the_serve_options(page):
    form = "document.getElementById('sample-form')"
    fields = ", ".join(f"{form}.{name}.value" for name in ("temperature", "temperature_end", "cfg_scale"))
    values = page.execute_script(f"return [{fields}]")
    assert values == ["0.9", "1.3", "2"]


def test_sample_draws_a_grid(page):
    page.find_element("name", "n").clear()
    page.find_element("name", "n").send_keys("16")
    page.find_element("id", "sample-go").click()
    ms = until(page, "window.vqgen.sampleMs[0]")
    print(f"first grid of 16 samples (tiny models): {ms:.0f} ms from click to picture")
    assert page.execute_script("return document.getElementById('sample-grid').naturalWidth") > 0
    assert page.find_element("id", "sample-npz").get_attribute("href").startswith("data:application/octet-stream")
    assert ms < 10_000


def test_painted_repair_differs_only_inside_the_paint(page):
    from selenium.webdriver.common.action_chains import ActionChains

    tab(page, "repair")
    until(page, "document.querySelector('#repair-tests img.chosen')")
    canvas = page.find_element("id", "repair-mask")
    size = canvas.size["width"]  # 16 image pixels, each `size / 16` screen pixels wide
    ActionChains(page).move_to_element_with_offset(canvas, -size // 4, -size // 4).click_and_hold() \
        .move_by_offset(size // 8, 0).move_by_offset(0, size // 8).release().perform()  # fmt: skip
    page.find_element("id", "repair-go").click()
    data = until(page, "window.vqgen.last.repair")
    original, painted = pixels(data["original"]), pixels(data["painted"]) > 0
    assert painted.any() and not painted[9:].any() and not painted[:, 9:].any()  # in the top-left quarter
    changed = np.zeros_like(painted)
    for url in data["repairs"]:
        repair = pixels(url)
        assert not (repair != original)[~painted].any(), "a repair changed a pixel that was not painted"
        changed |= repair != original
    assert changed.any()
    assert len(page.find_elements("css selector", "#repair-result img[data-role=repair]")) == len(data["repairs"])
    # towards a class, guided: the same paint, the kept pixels still the original's
    from selenium.webdriver.support.ui import Select

    classes = Select(page.find_element("id", "repair-label"))
    assert [o.text for o in classes.options] == ["none (unconditional)", "discs", "squares"]
    scale = page.find_element("css selector", "#repair-form [name=cfg_scale]")
    assert scale.get_attribute("value") == "1"  # not serve --cfg_scale 2: guidance needs a class here
    classes.select_by_visible_text("squares")
    scale.clear()
    scale.send_keys("3")
    page.execute_script("window.vqgen.last.repair = null")
    page.find_element("id", "repair-go").click()
    towards = until(page, "window.vqgen.last.repair")
    assert len(towards["repairs"]) == len(data["repairs"])
    assert pixels(towards["painted"]).tolist() == pixels(data["painted"]).tolist()
    for url in towards["repairs"]:
        assert not (pixels(url) != original)[~painted].any(), "a repair towards a class changed an unpainted pixel"
    assert " repairs towards squares, " in page.find_element("id", "repair-status").text
    classes.select_by_visible_text("none (unconditional)")  # guidance with no class: the server's one line
    page.find_element("id", "repair-go").click()
    message = until(page, "!document.getElementById('repair-error').hidden && "
                          "document.getElementById('repair-error').textContent")  # fmt: skip
    assert message == "CFG scale guides the repairs towards a class: choose one, or set it to 1"


def test_non_image_upload_shows_a_clear_error(page, tmp_path):
    tab(page, "compress")
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image\n")
    page.find_element("id", "compress-file").send_keys(str(bad))
    page.find_element("id", "compress-go").click()
    message = until(page, "!document.getElementById('compress-error').hidden && "
                          "document.getElementById('compress-error').textContent")  # fmt: skip
    assert "notes.txt: not an image this page can read" in message


def test_compress_then_decompress_gives_the_decompress_commands_pixels(page, world, tmp_path):  # noqa: F811
    tab(page, "compress")
    image = sorted(Path(world["images"]).iterdir())[0]
    page.find_element("id", "compress-file").send_keys(str(image))
    page.execute_script("window.vqgen.last.compress = null")
    page.find_element("id", "compress-go").click()
    until(page, "window.vqgen.last.compress")
    link = page.find_element("id", "compress-vqz")
    assert link.is_displayed() and link.get_attribute("download") == image.stem + ".vqz"
    vqz = tmp_path / "page.vqz"
    vqz.write_bytes(base64.b64decode(link.get_attribute("href").split(",", 1)[1]))
    page.find_element("id", "decompress-file").send_keys(str(vqz))
    page.find_element("id", "decompress-go").click()
    data = until(page, "window.vqgen.last.decompress")
    shown = page.find_elements("css selector", "#decompress-result img[data-role=decoded]")
    assert data["count"] == 1 and len(shown) == 1
    caption = page.find_element("css selector", "#decompress-result figcaption").text
    assert caption == image.stem + ".png"  # the upload's name, kept in the .vqz as `compress` keeps it
    main_decompress([str(vqz), "--prior", world["prior"], "--out", str(tmp_path / "cli")])
    np.testing.assert_array_equal(pixels(shown[0].get_attribute("src")),
                                  np.asarray(Image.open(tmp_path / "cli" / caption)))  # fmt: skip


def test_everything_came_from_the_server(page, server):
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server) for u in urls), urls


def test_twenty_concurrent_samples_are_all_answered(server):
    def one(i: int) -> tuple[int, float]:
        body = f"n=4&seed={i}".encode()
        request = urllib.request.Request(server + "api/sample", data=body, method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=WAIT) as r:
            answer = json.load(r)
            assert r.status == 200 and answer["grid"].startswith("data:image/png")
        return r.status, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    seconds = time.perf_counter() - t0
    slowest = max(s for _, s in results)
    print(f"20 concurrent requests of 4 samples: all answered in {seconds:.2f} s, the slowest in {slowest:.2f} s")
    assert [status for status, _ in results] == [200] * 20
    with urllib.request.urlopen(server + "api/health", timeout=WAIT) as r:
        assert json.load(r) == {"ok": True, "queued": 0}
