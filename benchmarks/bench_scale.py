"""iNat2021 scale: every command on the real 10,000-class table and synthetic caches of 100k to
2.7M rows, as a lab would run them (the command line, one process per command), with seconds
per 1,000 rows (or per step), peak memory and disk per row, and a log-log figure of cost.

The caches are written by the library's own writer (`write_synthetic_cache`): embeddings drawn
around taxonomy-shaped class centres, so each run's top-1 means something. Sizes:

  TAXOCLIP_SCALE_ROWS     train rows at 10,000 classes (default 100000,1000000; add 2700000)
  TAXOCLIP_SCALE_CLASSES  class counts at 100,000 rows (default 100,1000,10000)
  TAXOCLIP_SCALE_STEPS    the fixed step budget of each trainer (default 40)
  TAXOCLIP_SCALE_EPOCH=1  also one whole LiT epoch at 1M rows (hours on 2 cores)
  TAXOCLIP_SCALE_PARTS    which parts to run (default rows,classes,field; also ridge, epoch,
                          shards, features, openset): a part is a set of rows of the table
  TAXOCLIP_SCALE_PHOTOS   generated 64 x 64 JPEGs for the shards part (default 1000000)
  TAXOCLIP_SCALE_FEATURE_PHOTOS  the same for the features part (default 20000,100000: even a tiny
                          random tower's forward is ~200 photos/s on 2 cores, so 1M is hours)

Memory is sampled every 0.1 s over the command's process tree: "anon" is what the process
itself allocated (Linux's Anonymous: it cannot be given back while it runs); "rss" adds the
cache's file pages the kernel maps in, which it reclaims under pressure. Valid rows are a tenth
of train, at most 100,000.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import benchmark

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TAXOCLIP = [sys.executable, "-m", "taxoclip.apps.cli"]
DEFAULT_PARTS = "rows,classes,field"
LIT_BATCH = 512  # train lit's default --batch-size


def sizes(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


def anonymous_bytes(process) -> int:
    """Memory the process allocated itself (Linux's ``Anonymous`` in smaps_rollup). Not psutil's
    USS: that also counts the memory-mapped cache's clean file pages, which the kernel drops under
    pressure (a 1M-row cache is 2.8 GB of them)."""
    rollup = Path(f"/proc/{process.pid}/smaps_rollup")
    if rollup.exists():
        for line in rollup.read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    info = process.memory_full_info()
    return getattr(info, "uss", info.rss)


def measured(command: list[str], *, cwd: Path | None = None, kill_when=None) -> dict:
    """Run one command; wall seconds and the peak anonymous / resident memory of its process tree.
    ``kill_when``: a predicate polled as it runs; when true the whole process group is killed
    (SIGKILL, as a node failure would), to measure what a re-run resumes."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    peaks = {"anon": 0, "rss": 0}

    def sample() -> None:
        try:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                anon = rss = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                        anon += anonymous_bytes(p)
                    except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                        pass
                peaks["anon"], peaks["rss"] = max(peaks["anon"], anon), max(peaks["rss"], rss)
                if kill_when is not None and kill_when():
                    os.killpg(process.pid, signal.SIGKILL)
                    return
                time.sleep(0.1)
        except psutil.NoSuchProcess:
            pass

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output, _ = process.communicate()
    watcher.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0 and kill_when is None:
        print(output[-3000:], file=sys.stderr)
    return {
        "rc": process.returncode,
        "seconds": seconds,
        "peak_anon_mb": peaks["anon"] / 2**20,
        "peak_rss_mb": peaks["rss"] / 2**20,
        "output": output,
    }


def last_metrics(model: Path) -> dict:
    lines = (model / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def spread(classes, count: int):
    """``count`` classes taken evenly through the table (every kingdom, not only its first order)."""
    return classes.subset(classes.ids[:: max(1, len(classes) // count)][:count])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def make_cache(work: Path, classes, rows: int, tower: dict) -> tuple[Path, dict]:
    from taxoclip.data.features import write_synthetic_cache

    out = work / f"cache-{len(classes)}-{rows}"
    started = time.perf_counter()
    write_synthetic_cache(out, classes, rows=rows, valid_rows=min(100_000, rows // 10), tower=tower, progress=False)
    return out, {"seconds": time.perf_counter() - started, "bytes": folder_bytes(out)}


def row_of(
    command: str, classes: int, rows: int, result: dict, *, per: str, count: int, seconds: float | None = None, **extra
) -> dict:
    """One table row; the cost is ``seconds`` (default: the whole command's) per ``count``."""
    seconds = result["seconds"] if seconds is None else seconds
    row = {
        "command": command,
        "classes": classes,
        "rows": rows,
        "seconds": round(result["seconds"], 1),
        per: round(seconds / max(1, count) * (1000 if per == "s/1k rows" else 1), 4),
        "peak anon MB": round(result["peak_anon_mb"]),
        "peak rss MB": round(result["peak_rss_mb"]),
        "ok": result["rc"] == 0,
    }
    return row | extra


EXACT = {"exact match": "exact_match"}
NAMED = {"nearest line right": "name_class_right"}


def add(out: list[dict], row: dict) -> None:
    """One measured row: kept, and printed at once (a size can take an hour)."""
    out.append(row)
    print(json.dumps(row), flush=True)


def trained_row(
    command: str, argv: list[str], model: Path, n_classes: int, rows: int, steps: int, **columns: str
) -> dict:
    """Run a trainer for its step budget: its row, costed per step from the epoch's own seconds,
    with ``columns`` (column -> metrics key) read from its last metrics."""
    result = measured(argv)
    metrics = last_metrics(model) if result["rc"] == 0 else {}
    values = {column: metrics.get(key) for column, key in columns.items()}
    return row_of(command, n_classes, rows, result, per="s/step", count=steps, seconds=metrics.get("seconds"), **values)


def run_size(work: Path, classes, rows: int, tower: dict, steps: int, *, heavy: bool) -> list[dict]:
    """Every command at one size; ``heavy`` adds eval, questions + vqa (the 10,000-class rows)."""
    cache, written = make_cache(work, classes, rows, tower)
    n_classes = len(classes)
    valid = min(100_000, rows // 10)
    out: list[dict] = [
        {
            "command": "write_synthetic_cache",
            "classes": n_classes,
            "rows": rows,
            "seconds": round(written["seconds"], 1),
            "s/1k rows": round(written["seconds"] / (rows + valid) * 1000, 4),
            "disk B/row": round(written["bytes"] / (rows + valid)),
            "ok": True,
        }
    ]
    budget = ["--epochs", "1", "--steps-per-epoch", str(steps), "-q"]
    lit = work / f"lit-{n_classes}-{rows}"
    argv = [*TAXOCLIP, "train", "lit", "--features", str(cache), "-o", str(lit), *budget]
    row = trained_row("train lit", argv, lit, n_classes, rows, steps, top1="top1", loss="train_loss")
    # labels are uniform over the classes, so a batch of B holds C(1 - (1 - 1/C)^B) captions
    add(out, row | {"captions/batch": round(n_classes * (1 - (1 - 1 / n_classes) ** LIT_BATCH))})
    catlip = work / f"catlip-{n_classes}-{rows}"
    argv = [*TAXOCLIP, "train", "catlip", "--features", str(cache), "-o", str(catlip), *budget]
    add(out, trained_row("train catlip", argv, catlip, n_classes, rows, steps, top1="top1"))
    finetune = work / f"ft-{n_classes}-{rows}"
    command = [*TAXOCLIP, "train", "finetune", "--features", str(cache), "-o", str(finetune), "--depth", "head"]
    argv = [*command, "--balance", "100", *budget]
    add(out, trained_row("train finetune --balance 100", argv, finetune, n_classes, rows, steps, top1="top1"))
    add(out, openset_row(finetune, n_classes, rows))
    if heavy:
        report = work / f"eval-{n_classes}-{rows}"
        result = measured([*TAXOCLIP, "eval", "--model", str(lit), "--data", str(cache), "-o", str(report), "-q"])
        metrics = json.loads((report / "metrics.json").read_text()) if result["rc"] == 0 else {}
        probe = next(
            (
                r
                for r in metrics.get("comparison", [])
                if r["method"].startswith("logistic") and r["train images per class"] == "all"
            ),
            {},
        )
        add(
            out,
            row_of(
                "eval (with baselines)",
                n_classes,
                rows,
                result,
                per="s/1k rows",
                count=rows + valid,
                top1=metrics.get("metrics", {}).get("top1"),
                **{"probe top1": probe.get("top1")},
            ),
        )
        questions = work / f"qa-{n_classes}-{rows}.jsonl"
        result = measured([*TAXOCLIP, "questions", str(cache), "-o", str(questions)])
        disk = questions.stat().st_size if questions.exists() else 0
        add(
            out,
            row_of(
                "questions",
                n_classes,
                rows,
                result,
                per="s/1k rows",
                count=rows + valid,
                **{"disk B/row": round(disk / (rows + valid))},
            ),
        )
        if questions.exists():
            vqa = work / f"vqa-{n_classes}-{rows}"
            vqa_steps = max(1, steps // 4)  # a language-model step costs ~10 label-layer steps
            command = [*TAXOCLIP, "train", "vqa", "--features", str(cache), "--questions", str(questions)]
            budget_vqa = ["--epochs", "1", "--steps-per-epoch", str(vqa_steps), "--eval-questions", "20", "-q"]
            argv = [*command, "-o", str(vqa), *budget_vqa]
            add(out, trained_row("train vqa (stage 1)", argv, vqa, n_classes, rows, vqa_steps, **EXACT))
            names = work / f"vqa-names-{n_classes}-{rows}"
            # iNat2021's longest class line is 49 tokens
            argv = [*command, "--stage", "names", "--image-tokens", "56", "--batch-size", "64", "-o", str(names)]
            argv += ["--epochs", "1", "--steps-per-epoch", str(steps), "-q"]
            add(out, trained_row("train vqa --stage names", argv, names, n_classes, rows, steps, **NAMED))
    return out


def openset_row(model: Path, n_classes: int, rows: int) -> dict:
    """`taxoclip openset` on a trained model: the unknown-species score fitted from its training
    cache (class statistics streamed over every training row, calibration photos scored in chunks;
    with held-out species, the score, temperature and rank threshold chosen on half of them)."""
    result = measured([*TAXOCLIP, "openset", "--model", str(model)])
    record = json.loads((model / "novelty.json").read_text()) if result["rc"] == 0 else {}
    return row_of("openset (unknown-species score)", n_classes, rows, result, per="s/1k rows", count=rows,
                  score=record.get("score"))  # fmt: skip


def run_openset(work: Path, classes, rows: int, tower: dict, steps: int) -> list[dict]:
    """The open-set fit alone at one size (a CatLIP model trained for the step budget first, with 2%
    of the species held out: what the fit chooses on)."""
    cache, _ = make_cache(work, classes, rows, tower)
    model = work / f"catlip-openset-{len(classes)}-{rows}"
    budget = ["--epochs", "1", "--steps-per-epoch", str(steps), "--holdout", str(max(2, len(classes) // 50)), "-q"]
    trained = measured([*TAXOCLIP, "train", "catlip", "--features", str(cache), "-o", str(model), *budget])
    return [openset_row(model, len(classes), rows)] if trained["rc"] == 0 else []


def run_field(work: Path, classes, tower: dict, photos: list[Path], steps: int) -> list[dict]:
    """predict's cold start and per-photo time, serve's memory and ONNX size: 102 vs 10,000 classes."""
    out = []
    for table in (spread(classes, 102), classes):
        cache, _ = make_cache(work, table, 20_000, tower)
        model = work / f"field-lit-{len(table)}"
        if not (model / "config.json").exists():
            measured(
                [
                    *TAXOCLIP,
                    "train",
                    "lit",
                    "--features",
                    str(cache),
                    "-o",
                    str(model),
                    "--epochs",
                    "1",
                    "--steps-per-epoch",
                    str(steps),
                    "-q",
                ]
            )
        one = measured([*TAXOCLIP, "predict", str(photos[0]), "--model", str(model), "--format", "json", "-q"])
        many = measured([*TAXOCLIP, "predict", *map(str, photos), "--model", str(model), "--format", "json", "-q"])
        per_photo = (many["seconds"] - one["seconds"]) / max(1, len(photos) - 1)
        add(
            out,
            row_of(
                "predict cold start (1 photo)",
                len(table),
                0,
                one,
                per="s/photo",
                count=1,
                **{"extra s/photo": round(per_photo, 3)},
            ),
        )
        onnx = work / f"model-{len(table)}.onnx"
        result = measured([*TAXOCLIP, "export", "onnx", "--model", str(model), "-o", str(onnx)])
        add(
            out,
            row_of(
                "export onnx",
                len(table),
                0,
                result,
                per="s/photo",
                count=1,
                **{"onnx MB": round(folder_bytes(onnx) / 2**20, 1) if onnx.exists() else None},
            ),
        )
        exported = work / f"open_clip-{len(table)}"
        shutil.rmtree(exported, ignore_errors=True)
        result = measured([*TAXOCLIP, "export", "open_clip", "--model", str(model), "-o", str(exported)])
        add(
            out,
            row_of(
                "export open_clip",
                len(table),
                0,
                result,
                per="s/photo",
                count=1,
                **{"folder MB": round(folder_bytes(exported) / 2**20, 1) if exported.exists() else None},
            ),
        )
        add(out, serve_memory(model, len(table), photos))
    return out


def serve_memory(model: Path, n_classes: int, photos: list[Path]) -> dict:
    """The server's resident memory after it answered a few photos."""
    import socket

    import httpx
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [*TAXOCLIP, "serve", "--model", str(model), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started, answered = time.perf_counter(), 0
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        ready = time.perf_counter() - started
        for photo in photos[:8]:
            reply = httpx.post(f"http://127.0.0.1:{port}/api/predict", files={"files": photo.open("rb")}, timeout=60)
            answered += reply.status_code == 200
        rss = psutil.Process(server.pid).memory_info().rss
    finally:
        server.terminate()
        server.wait(10)
    return {
        "command": "serve (after 8 photos)",
        "classes": n_classes,
        "rows": 0,
        "seconds": round(ready, 1),
        "peak rss MB": round(rss / 2**20),
        "ok": answered == min(8, len(photos)),
    }


def run_ridge_start(work: Path, classes, rows: int, tower: dict) -> list[dict]:
    """LiT's top-1 at its ridge start (one step at learning rate 0): what its trained rows at the
    same size must beat, or training makes the classifier worse at 10,000 classes."""
    cache, _ = make_cache(work, classes, rows, tower)
    out = work / f"lit-start-{len(classes)}-{rows}"
    zero = ["--lr", "0", "--text-lr", "0", "--epochs", "1", "--steps-per-epoch", "1", "-q"]
    result = measured([*TAXOCLIP, "train", "lit", "--features", str(cache), "-o", str(out), *zero])
    metrics = last_metrics(out) if result["rc"] == 0 else {}
    row = row_of("train lit, ridge start (lr 0)", len(classes), rows, result, per="s/step", count=1)
    return [row | {"top1": metrics.get("top1"), "loss": metrics.get("train_loss")}]


def photo_folder(root: Path, classes, photos: int, side: int = 64) -> Path:
    """``root/<class id>/<n>.jpg``: ``photos`` small JPEGs spread over the classes, plus the class
    table as ``classes.csv`` (a folder source, as a lab's own photos would be). Made once: a later
    run with the same root reuses it. 512 distinct noisy pictures are cycled, so every file is a
    real JPEG that decodes, at the cost of one file write each."""
    import numpy as np
    from PIL import Image

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(512):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        pictures.append(buffer.getvalue())
    per_class, extra = divmod(photos, len(classes))
    written = 0
    for index, class_id in enumerate(classes.ids):
        folder = root / class_id
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class + (index < extra)):
            (folder / f"{n:05d}.jpg").write_bytes(pictures[written % len(pictures)])
            written += 1
    classes.to_csv(root / "classes.csv")
    (root / ".complete").touch()
    return root


def run_shards(work: Path, classes, photos: int, shard_size: int = 1000) -> list[dict]:
    """`shards` on ``photos`` generated photos: killed once half its shards are written, re-run
    (what the resume costs and keeps), then `shards verify`; the manifest's size."""
    started = time.perf_counter()
    root = photo_folder(work / f"photos-{photos}", classes, photos)
    made = time.perf_counter() - started
    out = work / f"shards-{photos}"
    shutil.rmtree(out, ignore_errors=True)
    expected = -(-photos // shard_size)
    command = [*TAXOCLIP, "shards", str(root), "-o", str(out), "--shard-size", str(shard_size), "-q"]

    def half_written() -> bool:
        return out.is_dir() and sum(1 for _ in out.glob("*.tar")) >= expected // 2

    out_rows: list[dict] = []
    killed = measured(command, kill_when=half_written)
    done = sum(1 for _ in out.glob("*.tar"))
    add(
        out_rows,
        row_of(
            "shards (killed at half)",
            len(classes),
            photos,
            killed,
            per="s/1k rows",
            count=done * shard_size,
            **{"shards written": done, "photos made s": round(made, 1)},
        ),
    )
    resumed = measured(command)
    manifest = json.loads((out / "manifest.json").read_text()) if resumed["rc"] == 0 else {}
    run = manifest.get("run", {})
    written = run.get("shards_written", 0) * shard_size
    add(
        out_rows,
        row_of(
            "shards (re-run: resumes)",
            len(classes),
            photos,
            resumed,
            per="s/1k rows",
            count=written,
            **{
                "images/s": run.get("images_per_second"),
                "shards resumed": run.get("shards_resumed"),
                "resume overhead s": round(resumed["seconds"] - run.get("seconds", 0), 1),
                "manifest MB": round((out / "manifest.json").stat().st_size / 2**20, 1) if manifest else None,
                "in = out + rejects": manifest.get("totals", {}).get("input")
                == manifest.get("totals", {}).get("written", -1) + manifest.get("totals", {}).get("rejected", -1),
            },
        ),
    )
    verify = measured([*TAXOCLIP, "shards", "verify", str(out)])
    add(out_rows, row_of("shards verify", len(classes), photos, verify, per="s/1k rows", count=photos))
    return out_rows


def run_features(work: Path, classes, photos: int, tower: str = "timm:test_byobnet") -> list[dict]:
    """`features` over the generated shards with a tiny random tower: what is measured is the
    pipeline's own cost per photo (planning, reading, decoding, merging the parts), not a forward."""
    shards = work / f"shards-{photos}"
    if not (shards / "manifest.json").exists():
        root = photo_folder(work / f"photos-{photos}", classes, photos)
        subprocess.run([*TAXOCLIP, "shards", str(root), "-o", str(shards), "-q"], check=True)
    out = work / f"features-{photos}"
    shutil.rmtree(out, ignore_errors=True)
    result = measured([*TAXOCLIP, "features", str(shards), "--tower", tower, "--random-weights", "-o", str(out), "-q"])
    meta = json.loads((out / "meta.json").read_text()) if result["rc"] == 0 else {}
    return [
        row_of(
            f"features ({tower}, random)",
            len(classes),
            photos,
            result,
            per="s/1k rows",
            count=photos,
            **{
                "cache rows": meta.get("count"),
                "disk B/row": round(folder_bytes(out) / max(1, meta.get("count", 1))) if meta else None,
                "extraction s": meta.get("seconds"),
            },
        )
    ]


def keep(rows: list[dict]) -> None:
    """The rows so far, so that a long run killed half way still leaves what it measured."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale-partial.json").write_text(json.dumps(rows, indent=1))


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_rows, by_classes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, fixed, label in (
        (by_rows, "rows", 10_000, "train rows (10,000 classes)"),
        (by_classes, "classes", None, "classes"),
    ):
        for command in dict.fromkeys(r["command"] for r in rows if r.get("rows")):
            points = [r for r in rows if r["command"] == command and r.get("ok")]
            if fixed is not None:
                points = [r for r in points if r["classes"] == fixed]
            else:
                base = min((r["rows"] for r in points), default=0)
                points = [r for r in points if r["rows"] == base]
            cost = [(r[key], r.get("s/step") or r.get("s/1k rows")) for r in points if r.get(key)]
            cost = sorted((x, y) for x, y in cost if y)
            if len(cost) > 1:
                axis.plot(*zip(*cost, strict=True), marker="o", label=command)
        axis.set(xscale="log", yscale="log", xlabel=label, ylabel="seconds per step or per 1,000 rows")
        axis.grid(True, which="both", alpha=0.3)
    by_rows.legend(fontsize=7)
    by_rows.set_title("cost against rows")
    by_classes.set_title("cost against classes (fixed rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@benchmark("scale")
def bench_scale(args) -> list[dict]:
    from taxoclip.data.paths import find_dataset
    from taxoclip.data.sources import load_source
    from taxoclip.models.towers import create_image_tower

    classes = load_source(find_dataset("inat2021") / "categories.json").classes
    tower = create_image_tower("efficientnet-lite0").describe()  # the rows pretend to be its embeddings
    steps = int(os.environ.get("TAXOCLIP_SCALE_STEPS", "40"))
    work = Path(os.environ.get("TAXOCLIP_SCALE_WORK") or tempfile.mkdtemp(prefix="taxoclip-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = set(os.environ.get("TAXOCLIP_SCALE_PARTS", DEFAULT_PARTS).split(","))
    if os.environ.get("TAXOCLIP_SCALE_EPOCH") == "1":
        parts.add("epoch")
    rows: list[dict] = []
    try:
        if "rows" in parts:
            for n in sizes("TAXOCLIP_SCALE_ROWS", "100000,1000000"):
                rows += run_size(work, classes, n, tower, steps, heavy=True)
                keep(rows)
        if "openset" in parts:
            for n in sizes("TAXOCLIP_SCALE_ROWS", "100000,1000000"):
                rows += run_openset(work, classes, n, tower, steps)
                keep(rows)
        if "ridge" in parts:
            rows += run_ridge_start(work, classes, min(sizes("TAXOCLIP_SCALE_ROWS", "100000,1000000")), tower)
            keep(rows)
        if "classes" in parts:
            base = min(sizes("TAXOCLIP_SCALE_ROWS", "100000,1000000"), default=0)
            for count in sizes("TAXOCLIP_SCALE_CLASSES", "100,1000,10000"):
                if count == len(classes) and base == 100_000 and "rows" in parts:
                    continue  # already run above
                rows += run_size(work, spread(classes, count), 100_000, tower, steps, heavy=False)
                keep(rows)
        if "field" in parts:
            photos = sorted((find_dataset("flowers102") / "valid").rglob("*.jpg"))[:16]
            rows += run_field(work, classes, tower, photos, steps)
            keep(rows)
        if "shards" in parts or "features" in parts:
            photos = int(os.environ.get("TAXOCLIP_SCALE_PHOTOS", "1000000"))
            if "shards" in parts:
                rows += run_shards(work, classes, photos)
                keep(rows)
            if "features" in parts:
                for count in sizes("TAXOCLIP_SCALE_FEATURE_PHOTOS", "20000,100000"):
                    for row in run_features(work, classes, count):
                        add(rows, row)
                    keep(rows)
        if "epoch" in parts:
            cache = work / "cache-10000-1000000"
            result = measured(
                [
                    *TAXOCLIP,
                    "train",
                    "lit",
                    "--features",
                    str(cache),
                    "-o",
                    str(work / "lit-epoch"),
                    "--epochs",
                    "1",
                    "-q",
                ]
            )
            metrics = last_metrics(work / "lit-epoch") if result["rc"] == 0 else {}
            rows.append(
                row_of(
                    "train lit, one whole epoch",
                    10_000,
                    1_000_000,
                    result,
                    per="s/1k rows",
                    count=1_000_000,
                    top1=metrics.get("top1"),
                )
            )
    finally:
        if not os.environ.get("TAXOCLIP_SCALE_WORK"):
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    figure(rows, RESULTS / "scale.png")
    return rows
