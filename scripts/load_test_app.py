"""Load test of the web demo: N concurrent clients on the loopback address for a fixed time.

    python scripts/load_test_app.py                                  # a tiny model, 8 clients, 30 s
    python scripts/load_test_app.py --model outputs/demo/dearli --clients 8 --seconds 60 --output load.json

Starts ``app.py --model MODEL --server_name 127.0.0.1`` in its own process (nothing listens beyond this machine),
segments every test image once with a single client (the reference), then lets ``--clients`` threads, each with its own
``gradio_client.Client``, send a random mix of good images (of several sizes) and bad uploads (empty, text named .jpg,
truncated JPEG, decompression bomb; ``--bad_share`` of the requests) for ``--seconds``. Every request must be answered:
a good image with exactly the reference's segments and result pictures (the downloaded files' bytes), a bad one with the
app's one-line refusal. The app process's resident memory is sampled throughout; after ``--warmup_seconds`` (while the
server's worker threads first allocate: about 100 MiB in the first 5 s of a tiny model's run, then flat) it must not
grow by more than ``--max_growth_mb`` from the first to the last quarter of the rest. Prints requests/s, latency
percentiles and peak memory; exit code 1 when any check fails.
Without ``--model`` a tiny randomly initialised DEARLi (3 classes, 96-160 px processor) is saved to a temporary
folder: the figures then measure the app's request handling more than the network.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import hashlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from training import cli

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> Any:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model folder served by app.py (default: a tiny model)")
    parser.add_argument("--clients", type=cli.positive_int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--seconds", type=cli.positive_float, default=30.0,
                        help="how long the clients send requests (default: 30)")
    parser.add_argument("--bad_share", type=cli.probability, default=0.25,
                        help="share of requests that upload a broken file (default: 0.25)")
    parser.add_argument("--max_growth_mb", type=cli.positive_float, default=100.0,
                        help="largest accepted growth of the app's memory, first to last quarter of the samples "
                             "after --warmup_seconds (default: 100)")
    parser.add_argument("--warmup_seconds", type=cli.non_negative_float, default=10.0,
                        help="seconds of load before memory growth is measured (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default: 0)")
    parser.add_argument("--startup_timeout", type=cli.positive_float, default=600.0,
                        help="seconds to wait for the app to answer (default: 600)")
    parser.add_argument("--output", default=None, help="also write the figures as JSON to this file")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------------------------------------
def _scene(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(100, 240, 3)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * 2 // 3, width, height), fill=tuple(int(v) for v in rng.integers(20, 160, 3)))
    for _ in range(3):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        draw.ellipse((x, y, x + 20 + int(rng.integers(0, 40)), y + 20 + int(rng.integers(0, 40))),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_test_images(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good images (three sizes, one a 16-bit PNG) and bad uploads -> ``(good, {bad: words of the refusal})``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for i, (width, height) in enumerate([(160, 120), (320, 240), (96, 200)]):
        path = folder / f"good_{i}.jpg"
        _scene(width, height, i).save(path, quality=92)
        good.append(path)
    ramp = np.linspace(0, 65535, 120 * 160).reshape(120, 160).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "good_16_bit.png")
    good.append(folder / "good_16_bit.png")
    buffer = io.BytesIO()
    _scene(160, 120, 9).save(buffer, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    bad = {"empty.jpg": b"", "text.jpg": b"not an image", "truncated.jpg": buffer.getvalue()[:300],
           "bomb.png": bomb.getvalue()}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return good, {folder / name: f"cannot read image {name}: " for name in bad}


def save_tiny_model(folder: Path) -> Path:
    from modeling_dearli import DearliImageProcessor, tiny_model

    model = tiny_model(class_names=["person,man,woman", "sky", "grass,lawn"], thing_ids=[0], seed=0)
    model.save_pretrained(folder)
    DearliImageProcessor.from_model_config(model.config, size={"shortest_edge": 96, "longest_edge": 160}) \
        .save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# The app process and its memory
# --------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resident_mb(pid: int) -> float:
    """Resident memory of a process and its children (Linux /proc), in MiB."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.is_file():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), resident_mb(self.pid)))
            self.stop.wait(self.interval)


def connect(url: str, process: subprocess.Popen, timeout: float) -> Any:
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise cli.CliError(f"app.py ended with exit code {process.returncode} before answering")
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise cli.CliError(f"app.py did not answer on {url} within {timeout:.0f} s") from None
            time.sleep(1.0)


# --------------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------------
def segment(client: Any, path: Path) -> tuple[list[list[Any]], list[str]]:
    """``(segment table rows, SHA-256 of the two result pictures as downloaded)`` of one request."""
    from gradio_client import handle_file

    decoder_only, ensembled, table, _ = client.predict(image=handle_file(str(path)), task="panoptic",
                                                       ensemble_alpha=0.6, api_name="/segment")  # the app's vocabulary
    pictures = [hashlib.sha256(Path(picture).read_bytes()).hexdigest() for picture in (decoder_only, ensembled)]
    return [list(row) for row in table["data"]], pictures


def client_loop(url: str, seed: int, deadline: float, good: list[Path], bad: dict[Path, str], bad_share: float,
                expected: dict[Path, list], records: list[dict[str, Any]]) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False)
    rng = random.Random(seed)
    first = True
    while time.monotonic() < deadline:
        is_bad = rng.random() < bad_share
        if first and bad_share > 0:  # every other client starts with a bad upload: both kinds in every run
            is_bad, first = seed % 2 == 1, False
        path = rng.choice(sorted(bad)) if is_bad else rng.choice(good)
        started = time.monotonic()
        record = {"file": path.name, "bad": is_bad}
        try:
            rows, pictures = segment(client, path)
            record["outcome"] = "wrong: a bad upload was segmented" if is_bad else \
                ("wrong: other segments than a single client's" if rows != expected[path][0] else
                 "wrong: other pictures than a single client's" if pictures != expected[path][1] else "ok")
        except AppError as error:
            message = str(error)
            record["outcome"] = "ok" if is_bad and message.startswith(bad[path]) and "\n" not in message else \
                f"wrong: {message[:200]}"
        except Exception as error:  # noqa: BLE001 - an unanswered request is what this test looks for
            record["outcome"] = f"unanswered: {type(error).__name__}: {str(error)[:200]}"
        record["seconds"] = time.monotonic() - started
        records.append(record)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output:
        args.output = cli.check_output_file(args.output, overwrite=True)
    with tempfile.TemporaryDirectory(prefix="dearli_load_") as tmp:
        tmp = Path(tmp)
        model = args.model or str(save_tiny_model(tmp / "model"))
        good, bad = write_test_images(tmp / "images")
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
        log = open(tmp / "app.log", "wb")  # noqa: SIM115 - closed below, after the process
        process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", model, "--server_name",
                                    "127.0.0.1", "--server_port", str(port), "--device", "cpu"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        try:
            reference_client = connect(url, process, args.startup_timeout)
            expected = {path: segment(reference_client, path) for path in good}  # one client, one request at a time
            sampler = MemorySampler(process.pid)
            sampler.start()
            records: list[dict[str, Any]] = []
            started = time.monotonic()
            deadline = started + args.seconds
            threads = [threading.Thread(target=client_loop, args=(url, args.seed + i, deadline, good, bad,
                                                                  args.bad_share, expected, records))
                       for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            sampler.stop.set()
            sampler.join()
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        app_log = (tmp / "app.log").read_text(errors="replace")

    latencies = [r["seconds"] for r in records]
    memory = [mb for _, mb in sampler.samples]
    settled = [mb for t, mb in sampler.samples if t >= started + args.warmup_seconds]
    quarter = max(1, len(settled) // 4)
    growth = float(np.mean(settled[-quarter:]) - np.mean(settled[:quarter])) if settled else float("nan")
    failures = [r for r in records if r["outcome"] != "ok"]
    figures = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": len(records),
        "bad_requests": sum(r["bad"] for r in records),
        "requests_per_second": round(len(records) / elapsed, 2),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "latency_max_s": round(max(latencies, default=float("nan")), 3),
        "memory_start_mb": round(memory[0], 1) if memory else None,
        "memory_peak_mb": round(max(memory), 1) if memory else None,
        "memory_growth_mb": round(growth, 1),
        "failures": len(failures),
        "failure_examples": [f"{r['file']}: {r['outcome']}" for r in failures[:5]],
        "tracebacks_in_app_log": app_log.count("Traceback"),
        "model": args.model or "tiny (3 classes, processor 96-160 px)",
    }
    print(f"{figures['clients']} clients, {figures['seconds']} s, model {figures['model']}: {figures['requests']} "
          f"requests ({figures['bad_requests']} bad uploads), {figures['requests_per_second']} requests/s, latency "
          f"p50 {figures['latency_p50_s']} s / p95 {figures['latency_p95_s']} s / max {figures['latency_max_s']} s; "
          f"app memory {figures['memory_start_mb']} MiB at the start, peak {figures['memory_peak_mb']} MiB, growth "
          f"{figures['memory_growth_mb']} MiB (after the warm-up, first to last quarter); "
          f"{figures['failures']} failed requests, "
          f"{figures['tracebacks_in_app_log']} tracebacks in the app's output", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=1))
    problems = []
    if failures:
        problems.append(f"{len(failures)} requests failed, e.g. {figures['failure_examples']}")
    if not records:
        problems.append("no request was answered")
    if figures["tracebacks_in_app_log"]:
        problems.append("the app printed a traceback")
    if not settled:
        problems.append(f"no memory sample after --warmup_seconds {args.warmup_seconds:g} (run longer)")
    elif not growth <= args.max_growth_mb:
        problems.append(f"the app's memory grew by {growth:.1f} MiB (more than --max_growth_mb {args.max_growth_mb:g})")
    for problem in problems:
        print(f"load_test_app.py: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    cli.run(main)
