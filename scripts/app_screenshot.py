"""Drive the web demo (app.py) in headless Chromium: upload an image, run a segmentation, save a screenshot.

    python scripts/app_screenshot.py --image outputs/demo/examples/<name>.png --output model_cards/app_screenshot.png

starts ``python app.py`` (with ``--model``, default: the app's own default model) on a free local port, opens it in
the system Chromium (Debian's ``chromium`` package, driven by Playwright; nothing is downloaded), uploads ``--image``,
presses Segment, waits for the result pictures and the segment table, and writes a screenshot of the page (palette PNG,
small enough to ship). The browser test (``tests/test_app.py``) uses the same functions.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from training import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
# Headless Chromium as root in a container: no sandbox, no GPU, nothing that calls home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    """The system Chromium (``/usr/bin/chromium`` from Debian's package), or ``None``."""
    for candidate in ("chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app_file: str | os.PathLike, app_args: list[str], log_path: str | os.PathLike,
              port: int | None = None, timeout_s: float = 180.0) -> Iterator[str]:
    """Run ``python <app_file> <app_args>`` from the app's folder on a local port (output to ``log_path``) until the
    context ends; yields its URL once it answers."""
    port = port or free_port()
    app_file = Path(app_file).resolve()
    command = [sys.executable, str(app_file), *app_args, "--server_name", "127.0.0.1", "--server_port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=app_file.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            while not _answers(url):
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with code {process.returncode}:\n"
                                       f"{Path(log_path).read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"app.py did not answer on {url} within {timeout_s:.0f} s")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def segment_in_browser(url: str, image: str | os.PathLike, screenshot: str | os.PathLike, task: str = "panoptic",
                       ensemble_alpha: float | None = None, chromium: str | None = None,
                       viewport: tuple[int, int] = (1400, 900), timeout_s: float = 120.0) -> dict:
    """Open the app in headless Chromium, upload ``image``, choose ``task`` (and ``ensemble_alpha``), press Segment,
    wait for both result pictures and the segment table, save a full-page ``screenshot``. Returns ``{"rows": [[label,
    score, area],
    ...], "pictures": [(width, height) of the result images], "status": text, "page_text": the page's text}``."""
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium found: install Debian's package (apt-get install -y chromium)")
    timeout_ms = timeout_s * 1000
    with tempfile.TemporaryDirectory(prefix="dearli-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            page.locator("#input-image input[type=file]").set_input_files(str(image))
            page.locator("#input-image img").first.wait_for(state="visible")
            page.locator("#task").get_by_text(task, exact=True).click()
            if ensemble_alpha is not None:
                page.locator("#ensemble-alpha input[type=number]").fill(str(ensemble_alpha))
            page.locator("#segment").click()
            page.locator("#status").get_by_text("ensemble_alpha =").wait_for(state="visible")  # written last
            for elem_id in ("decoder-only", "ensembled"):
                page.locator(f"#{elem_id} img").first.wait_for(state="visible")
            rows = page.locator("#segments [role=grid] [role=row][data-index]")  # Gradio 6's table rows
            rows.first.wait_for(state="visible")
            table = [[cell.inner_text().strip() for cell in row.locator("[role=gridcell]").all()] for row in rows.all()]
            pictures = [page.locator(f"#{elem_id} img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                        for elem_id in ("decoder-only", "ensembled")]
            status = page.locator("#status").inner_text()
            page_text = page.locator("body").inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    return {"rows": table, "pictures": [tuple(p) for p in pictures], "status": status, "page_text": page_text}


def shrink_png(path: str | os.PathLike, max_width: int = 1400, colours: int = 256) -> None:
    """Rewrite a screenshot as a palette PNG (at most ``max_width`` wide): a fraction of the size, same look."""
    picture = Image.open(path).convert("RGB")
    if picture.width > max_width:
        picture = picture.resize((max_width, round(picture.height * max_width / picture.width)), Image.LANCZOS)
    picture.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True, help="The image to upload and segment.")
    parser.add_argument("--output", required=True, help="Screenshot file (PNG).")
    parser.add_argument("--model", default=None, help="Model folder or Hub id for app.py (default: the app's default).")
    parser.add_argument("--examples", default=None, help="Example images folder for app.py (default: the app's).")
    parser.add_argument("--task", choices=["panoptic", "semantic", "instance"], default="panoptic", help="Task to run.")
    parser.add_argument("--ensemble_alpha", type=float, default=None,
                        help="Value for the ensemble_alpha slider (default: the model's).")
    parser.add_argument("--width", type=int, default=1400, help="Browser viewport width in pixels.")
    parser.add_argument("--height", type=int, default=900, help="Browser viewport height in pixels.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    app_args = ["--model", args.model] if args.model else []
    app_args += ["--examples", args.examples] if args.examples else []
    with tempfile.TemporaryDirectory() as tmp, serve_app(REPO_ROOT / "app.py", app_args, Path(tmp) / "app.log") as url:
        found = segment_in_browser(url, args.image, args.output, task=args.task, ensemble_alpha=args.ensemble_alpha,
                                   viewport=(args.width, args.height))
    shrink_png(args.output, max_width=args.width)
    print(f"{args.output}: {len(found['rows'])} segments; {found['status']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
