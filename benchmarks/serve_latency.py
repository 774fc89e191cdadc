"""The page's latency in a real browser: `serve` with trained models, headless Chromium clicks Sample and
the page measures the time from the click to the grid's image being loaded (request, model, PNG, decode).

    python benchmarks/serve_latency.py --prior runs/stage2_transformer/latest/checkpoints/best.ckpt \\
        --n 16 --clicks 7 --screenshot docs/serve.png --json benchmarks/results/serve_latency.json

Reports the first click after the page loads (the target: a grid of 16 Fashion-MNIST samples within 2 s) and
the median and worst of the clicks, each with a new seed. Needs chromium and chromium-driver (Debian).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from _common import machine, report  # also puts the repo root on sys.path
from PIL import Image
from selenium.webdriver.support.ui import WebDriverWait

from tools.browser import chromium, serving


def click_sample(driver, n: int, seed: int, label: str) -> float:
    """Set the form, click Sample, wait for the grid; the page's click-to-picture time in ms."""
    form = {"n": n, "seed": seed, "label": label}
    fill = "const f = document.getElementById('sample-form');"
    driver.execute_script(fill + "for (const [k, v] of Object.entries(arguments[0])) f.elements[k].value = v;", form)
    before = driver.execute_script("return window.vqgen.sampleMs.length")
    driver.find_element("id", "sample-go").click()
    WebDriverWait(driver, 60, poll_frequency=0.01).until(
        lambda d: d.execute_script("return window.vqgen.sampleMs.length") > before)
    return driver.execute_script("return window.vqgen.sampleMs.at(-1)")


def screenshot(driver, path: str) -> int:
    """The visible page as a small PNG (a 64-colour palette keeps it well under 300 kB); its size in bytes."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    return len(open(path, "rb").read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True)
    p.add_argument("--vqvae", default=None)
    p.add_argument("--n", type=int, default=16, help="samples per click")
    p.add_argument("--label", default="-1", help="class id, -1 for all classes (one column each)")
    p.add_argument("--clicks", type=int, default=7)
    p.add_argument("--threads", default=None, help="OMP_NUM_THREADS for the server (default: torch's choice)")
    p.add_argument("--screenshot", default=None, help="also save the page after the clicks (PNG)")
    p.add_argument("--screenshot_n", type=int, default=30, help="samples in the screenshot (one more click, untimed)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    args = ["--prior", a.prior, "--device", "cpu"] + (["--vqvae", a.vqvae] if a.vqvae else [])
    env = {"OMP_NUM_THREADS": a.threads} if a.threads else {}
    t0 = time.perf_counter()
    with serving(args, env=env) as url, chromium(1100, 760) as driver:
        ready = time.perf_counter() - t0
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready"))
        times = [click_sample(driver, a.n, seed, a.label) for seed in range(a.clicks)]
        if a.screenshot:
            click_sample(driver, a.screenshot_n, a.clicks, a.label)
            driver.execute_script("window.scrollTo(0, 0)")
            shot_bytes = screenshot(driver, a.screenshot)
    result = {"what": f"click Sample ({a.n} samples, label {a.label}) -> grid loaded, in the browser",
              "prior": a.prior, "first_click_ms": round(times[0], 1), "median_ms": round(statistics.median(times), 1),
              "worst_ms": round(max(times), 1), "clicks": a.clicks, "all_ms": [round(t, 1) for t in times],
              "server_ready_s": round(ready, 2), "omp_threads": a.threads or "default", **machine("cpu")}  # fmt: skip
    if a.screenshot:
        result["screenshot"] = f"{a.screenshot} ({shot_bytes} bytes)"
    report(result, a.json)


if __name__ == "__main__":
    main()
