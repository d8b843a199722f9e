"""Field use, measured side by side on real photos with the real towers (a 5-class flowers model
trained here, so the benchmark needs nothing but ../shared/data):

- one photo end to end (read, decode, preprocess, forward, answer) vs the bare forward pass;
- ONNX Runtime vs PyTorch on the CPU, one photo and a batch of 16;
- the web server under 30 s of concurrent requests on loopback: requests/s, errors, memory.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

import taxoclip
from common import benchmark
from taxoclip.apps.demo import run_demo
from taxoclip.data.paths import find_dataset
from taxoclip.inference.predict import torch_predictor

REPEATS = 30
LOAD_SECONDS, CONCURRENCY = 30, 8


def median_seconds(function, repeats: int = REPEATS) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@benchmark("field")
def bench_field(args) -> list[dict]:
    import httpx

    flowers = find_dataset("flowers102")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_demo(data=str(flowers), out=tmp / "demo", quick=True)
        model_dir = tmp / "demo" / "model"
        model = taxoclip.load(model_dir)
        predictor = torch_predictor(model)
        tower = model.image_tower
        photos = sorted((flowers / "valid" / model.classes.ids[0]).glob("*.jpg"))
        photo = photos[0]
        pixels = tower.preprocess.to_uint8(Image.open(photo))[None]

        bare = median_seconds(lambda: tower.embed(pixels))
        end_to_end = median_seconds(lambda: predictor.predict_paths([photo]))
        rows.append({"what": "bare forward, one pre-decoded photo (efficientnet-lite0)", "ms": 1000 * bare})
        rows.append(
            {"what": "one photo end to end: read, decode, preprocess, forward, answer", "ms": 1000 * end_to_end}
        )
        rows.append({"what": "end to end / bare forward (aim <= 1.3)", "ratio": end_to_end / bare})

        from taxoclip.inference.export import OnnxClassifier, export_onnx

        onnx = OnnxClassifier(export_onnx(model_dir, tmp / "model.onnx"))
        batch = torch.stack([tower.preprocess.to_uint8(Image.open(p)) for p in (photos * 4)[:16]])
        with torch.no_grad():
            torch_one = median_seconds(lambda: model.probabilities_from_features(tower.embed(pixels)))
            torch_batch = median_seconds(lambda: model.probabilities_from_features(tower.embed(batch)), 10)
        onnx_one = median_seconds(lambda: onnx(pixels))
        onnx_batch = median_seconds(lambda: onnx(batch), 10)
        rows.append({"what": "PyTorch, 1 photo (classifier included)", "ms": 1000 * torch_one})
        rows.append({"what": "ONNX Runtime, 1 photo", "ms": 1000 * onnx_one, "ratio": torch_one / onnx_one})
        rows.append({"what": "PyTorch, batch of 16", "ms": 1000 * torch_batch})
        rows.append({"what": "ONNX Runtime, batch of 16", "ms": 1000 * onnx_batch, "ratio": torch_batch / onnx_batch})

        port = 8779
        server = subprocess.Popen(
            [sys.executable, "-m", "taxoclip", "serve", "--model", str(model_dir), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/api/info", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            data = photo.read_bytes()
            with httpx.Client(timeout=30) as client:  # warm-up, then memory at the start
                client.post(f"{url}/api/predict", files=[("files", ("p.jpg", data, "image/jpeg"))])
            memory_start = rss_mb(server.pid)
            stop = time.time() + LOAD_SECONDS

            def worker() -> tuple[int, int]:
                ok = errors = 0
                with httpx.Client(timeout=30) as client:
                    while time.time() < stop:
                        response = client.post(f"{url}/api/predict", files=[("files", ("p.jpg", data, "image/jpeg"))])
                        ok, errors = (ok + 1, errors) if response.status_code == 200 else (ok, errors + 1)
                return ok, errors

            started = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                results = list(pool.map(lambda _: worker(), range(CONCURRENCY)))
            elapsed = time.perf_counter() - started
            ok, errors = sum(r[0] for r in results), sum(r[1] for r in results)
            rows.append(
                {
                    "what": f"server, {CONCURRENCY} concurrent clients for {LOAD_SECONDS} s: requests/s",
                    "requests/s": ok / elapsed,
                    "errors": errors,
                }
            )
            rows.append(
                {
                    "what": "server memory (MB) at start -> end of the load",
                    "start MB": memory_start,
                    "end MB": rss_mb(server.pid),
                }
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return rows
