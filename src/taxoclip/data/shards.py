"""WebDataset shards: writing (parallel, resumable), reading, and verification against a manifest.

Each sample holds ``<image key>`` (the original bytes: ``jpg`` for JPEG, ``png`` for PNG, ...),
``txt`` (the caption in the configured style), ``json`` (class metadata, every caption style,
source path, split) and ``cls`` (class index). Samples are shuffled with a seed, split into shards
by count and/or bytes, and written by worker processes.

Resumability: a shard is written to ``NAME.tar.tmp``, its record ``NAME.json`` is written, and
only then is the tar renamed to ``NAME.tar``, so a ``.tar`` never exists half-written. A re-run
with the same plan (same images, classes, captions, seed and sizes) keeps finished shards and
writes the rest; ``manifest.json`` is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import queue
import random
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import TypeVar

from tqdm import tqdm

from taxoclip.data.captions import CaptionSet
from taxoclip.data.images import IMAGE_KEYS, BadImage, check_image, read_photo, resize_shorter_side
from taxoclip.errors import TaxoclipError
from taxoclip.output_lock import locks_output
from taxoclip.taxonomy import Dataset

T = TypeVar("T")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PROGRESS_EVERY = 32  # images between progress messages from a worker
# Bytes a sample adds besides its image (4 tar headers and padding, caption, metadata JSON), so
# that --shard-mb bounds the real file size; tar's end-of-archive records add up to 10 KiB more.
SAMPLE_OVERHEAD = 5 * 1024


@dataclass
class ShardSpec:
    """One shard to write: its name and its samples as (key, path, class index)."""

    name: str
    split: str
    samples: list[tuple[str, str, int]]


@dataclass
class ShardPlan:
    shards: list[ShardSpec]
    rejects: list[dict[str, str]]  # found while planning (e.g. missing files)
    plan_id: str
    input_count: int


@dataclass
class ShardOptions:
    seed: int = 0
    max_count: int = 1000
    max_bytes: int | None = None
    resize: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_shards(dataset: Dataset, options: ShardOptions, fingerprint: dict) -> ShardPlan:
    """Decide, deterministically, which sample goes to which shard under which key."""
    if options.max_count < 1:
        raise TaxoclipError("--shard-size must be at least 1")
    index_of = dataset.classes.index_of()
    rejects: list[dict[str, str]] = []
    shards: list[ShardSpec] = []
    hasher = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for split in dataset.splits:
        samples = sorted((s for s in dataset.samples if s.split == split), key=lambda s: s.path)
        random.Random(f"{options.seed}-{split}").shuffle(samples)
        sized: list[tuple[tuple[str, str, int], int]] = []
        for position, sample in enumerate(samples):
            key = f"{split}-{position:07d}"
            try:
                stat = os.stat(sample.path)
                if not S_ISREG(stat.st_mode):
                    raise BadImage("not a regular file (a pipe, device or folder)")
            except (OSError, BadImage) as error:
                reason = f"cannot read: {error.strerror}" if isinstance(error, OSError) else str(error)
                rejects.append({"key": key, "path": sample.path, "split": split, "reason": reason})
                continue
            hasher.update(f"{key}\0{sample.path}\0{sample.class_id}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            sized.append(((key, sample.path, index_of[sample.class_id]), stat.st_size + SAMPLE_OVERHEAD))
        for number, group in enumerate(group_by_size(sized, options.max_count, options.max_bytes)):
            shards.append(ShardSpec(f"{split}-{number:06d}", split, group))
    return ShardPlan(shards, rejects, hasher.hexdigest()[:16], len(dataset.samples))


def group_by_size(items: list[tuple[T, int]], max_count: int, max_bytes: int | None) -> list[list[T]]:
    """Consecutive groups of at most ``max_count`` items and (past the first) ``max_bytes`` bytes."""
    groups: list[list[T]] = []
    current: list[T] = []
    current_bytes = 0
    for item, size in items:
        too_big = max_bytes is not None and current and current_bytes + size > max_bytes
        if len(current) >= max_count or too_big:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        groups.append(current)
    return groups


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, root owner) so the same inputs always give the same bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def write_one_shard(
    spec: ShardSpec,
    out_dir: str,
    plan_id: str,
    classes: list[dict[str, str]],
    captions: list[dict[str, str]],
    style: str,
    resize: int | None,
    progress,
) -> dict:
    """Write one shard (in a worker process) and return its record."""
    out = Path(out_dir)
    final, temporary = out / f"{spec.name}.tar", out / f"{spec.name}.tar.tmp"
    rejects, class_counts, keys = [], Counter(), []
    pending = 0
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, path, class_index in spec.samples:
            pending += 1
            if pending == PROGRESS_EVERY:
                progress.put(pending)
                pending = 0
            try:
                data = read_photo(path)
                image_key = check_image(data)
                if resize:
                    data, image_key = resize_shorter_side(data, resize), "jpg"
            except BadImage as error:
                rejects.append({"key": key, "path": path, "split": spec.split, "reason": str(error)})
                continue
            except OSError as error:
                rejects.append(
                    {"key": key, "path": path, "split": spec.split, "reason": f"cannot read: {error.strerror}"}
                )
                continue
            row = classes[class_index]
            meta = {
                "key": key,
                "path": path,
                "split": spec.split,
                "class_index": class_index,
                "class": row,
                "captions": captions[class_index],
            }
            add_member(archive, f"{key}.{image_key}", data)
            add_member(archive, f"{key}.txt", captions[class_index][style].encode())
            add_member(archive, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
            add_member(archive, f"{key}.cls", str(class_index).encode())
            class_counts[row["id"]] += 1
            keys.append(key)
    progress.put(pending)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    record = {
        "name": final.name,
        "split": spec.split,
        "plan_id": plan_id,
        "count": len(keys),
        "bytes": temporary.stat().st_size,
        "sha256": sha256_of(temporary),
        "class_counts": dict(sorted(class_counts.items())),
        "keys": keys,
        "rejects": rejects,
    }
    write_json_atomic(out / f"{spec.name}.json", record)
    os.replace(temporary, final)
    return record


def write_json_atomic(path: Path, payload: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def finished_record(out: Path, spec: ShardSpec, plan_id: str) -> dict | None:
    """The record of a shard an earlier run finished with this same plan, else None."""
    tar, record_path = out / f"{spec.name}.tar", out / f"{spec.name}.json"
    if not (tar.exists() and record_path.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("plan_id") != plan_id or record.get("bytes") != tar.stat().st_size:
        return None
    return record


def check_output_dir(out: Path, plan_id: str, overwrite: bool) -> None:
    manifest = out / MANIFEST
    if not manifest.exists():
        return
    try:
        existing = json.loads(manifest.read_text()).get("plan_id")
    except (OSError, json.JSONDecodeError):
        existing = None
    if existing == plan_id:
        return
    if not overwrite:
        raise TaxoclipError(
            f"{out} already holds shards made from other inputs or settings; "
            "choose another output folder or pass --overwrite to replace them"
        )
    for path in out.iterdir():
        if (
            path.suffix in (".tar", ".tmp")
            or path.name == MANIFEST
            or (path.suffix == ".json" and (out / (path.stem + ".tar")).exists())
        ):
            path.unlink()


@locks_output("out_dir")
def write_shards(
    dataset: Dataset,
    out_dir: str | Path,
    captions: CaptionSet,
    options: ShardOptions | None = None,
    *,
    overwrite: bool = False,
) -> dict:
    """Write ``dataset`` as WebDataset shards under ``out_dir`` and return the manifest."""
    options = options or ShardOptions()
    if not dataset.samples:
        raise TaxoclipError(f"{dataset.source.get('path')}: has class metadata but no images to shard")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "classes": dataset.classes.to_json(),
        "captions": captions.by_class,
        "style": captions.style,
        "resize": options.resize,
        "seed": options.seed,
        "max_count": options.max_count,
        "max_bytes": options.max_bytes,
        "version": MANIFEST_VERSION,
    }
    plan = plan_shards(dataset, options, fingerprint)
    check_output_dir(out, plan.plan_id, overwrite)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()

    started = time.perf_counter()
    records: dict[str, dict] = {}
    todo = []
    for spec in plan.shards:
        record = finished_record(out, spec, plan.plan_id)
        if record is None:
            todo.append(spec)
        else:
            records[spec.name] = record
    resumed = len(records)
    classes_json = dataset.classes.to_json()
    total = sum(len(s.samples) for s in todo)
    bar = tqdm(total=total, unit="img", desc="shards", disable=not options.progress, smoothing=0.1)
    # Workers come from a fork server, not forked from this process: a fork would share the plan's
    # million Python objects copy-on-write, and each worker's garbage collector, walking them,
    # would copy them (measured: 2 GB over three processes at 1M photos).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["taxoclip.data.shards"])
    with context.Manager() as manager:
        progress = manager.Queue()
        workers = max(1, min(options.workers, len(todo) or 1))
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [
                pool.submit(
                    write_one_shard,
                    spec,
                    str(out),
                    plan.plan_id,
                    classes_json,
                    captions.by_class,
                    captions.style,
                    options.resize,
                    progress,
                )
                for spec in todo
            ]
            while not all(f.done() for f in futures):
                with contextlib.suppress(queue.Empty):
                    bar.update(progress.get(timeout=0.1))
            for future in futures:
                record = future.result()
                records[record["name"].removesuffix(".tar")] = record
        while not progress.empty():
            bar.update(progress.get())
    bar.close()
    elapsed = time.perf_counter() - started

    manifest = build_manifest(dataset, captions, options, plan, [records[s.name] for s in plan.shards])
    manifest["run"] = {
        "seconds": round(elapsed, 3),
        "shards_written": len(todo),
        "shards_resumed": resumed,
        "images_per_second": round(total / elapsed, 1) if elapsed > 0 else None,
    }
    write_json_atomic(out / MANIFEST, manifest)
    remember_written(out, manifest["shards"])
    return manifest


def build_manifest(
    dataset: Dataset, captions: CaptionSet, options: ShardOptions, plan: ShardPlan, records: list[dict]
) -> dict:
    rejects = plan.rejects + [r for record in records for r in record["rejects"]]
    written = sum(r["count"] for r in records)
    per_split: dict[str, dict] = {}
    for record in records:
        entry = per_split.setdefault(record["split"], {"count": 0, "shards": [], "class_counts": Counter()})
        entry["count"] += record["count"]
        entry["shards"].append(record["name"])
        entry["class_counts"].update(record["class_counts"])
    for entry in per_split.values():
        entry["class_counts"] = dict(sorted(entry["class_counts"].items()))
        entry["classes"] = len(entry["class_counts"])
    reject_reasons = Counter(r["reason"].split(" (")[0] for r in rejects)
    return {
        "version": MANIFEST_VERSION,
        "plan_id": plan.plan_id,
        "source": dataset.source,
        "options": {
            "seed": options.seed,
            "max_count": options.max_count,
            "max_bytes": options.max_bytes,
            "resize": options.resize,
        },
        "totals": {
            "input": plan.input_count,
            "written": written,
            "rejected": len(rejects),
            "reject_reasons": dict(reject_reasons),
        },
        "splits": per_split,
        "shards": [{k: r[k] for k in ("name", "split", "count", "bytes", "sha256", "class_counts")} for r in records],
        "classes": dataset.classes.to_json(),
        "captions": {"config": captions.config(), "by_class": captions.by_class},
        "rejects": rejects,
    }


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise TaxoclipError(f"{shard_dir}: no {MANIFEST}; is this a folder written by 'taxoclip shards'?")
    try:
        manifest = json.loads(path.read_text())
        names = [shard["name"] for shard in manifest["shards"]]
    except json.JSONDecodeError as error:
        raise TaxoclipError(f"{path}: damaged ({error.msg}); re-run 'taxoclip shards' to rebuild it") from None
    except (KeyError, TypeError):
        raise TaxoclipError(
            f"{path}: not a taxoclip shard manifest (no shard list); re-run 'taxoclip shards'"
        ) from None
    # Shard names come from a file anyone can edit: each must be a plain file name in this folder,
    # never a path that reads (or makes the feature cache write) elsewhere.
    outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if outside:
        raise TaxoclipError(f"{path}: shard name {outside[0]!r} is not a file in {shard_dir}; the manifest was altered")
    return manifest


VERIFIED = ".verified.json"  # shard -> [bytes, mtime_ns, sha256] of files whose checksum was checked


def check_shard_files(shard_dir: str | Path, shards: list[dict]) -> None:
    """Evidence that the shard files are the ones the manifest describes, before anything trusts a
    cache keyed by the manifest: present, the same size, and the manifest's sha256, which is only
    recomputed for a file whose size or modification time differs from when it was last checked
    (``.verified.json``; written by 'taxoclip shards', updated here where the folder is writable)."""
    folder = Path(shard_dir)
    verified = read_verified(folder)
    changed = False
    for shard in shards:
        path = folder / shard["name"]
        if not path.is_file():
            raise TaxoclipError(f"{path}: missing (the manifest lists it); re-run 'taxoclip shards'")
        stat = path.stat()
        expected = shard.get("bytes")
        if expected is not None and stat.st_size != expected:
            raise TaxoclipError(
                f"{path}: {stat.st_size} bytes, the manifest says {expected}: the shard changed after it "
                "was written; run 'taxoclip shards verify' and rebuild the shards"
            )
        wanted = shard.get("sha256")
        if wanted is None or verified.get(shard["name"]) == [stat.st_size, stat.st_mtime_ns, wanted]:
            continue
        if sha256_of(path) != wanted:
            raise TaxoclipError(
                f"{path}: its bytes changed after it was written (the size is the same, the checksum is not); "
                "anything computed from it would be stale: rebuild the shards with 'taxoclip shards --overwrite'"
            )
        verified[shard["name"]] = [stat.st_size, stat.st_mtime_ns, wanted]
        changed = True
    if changed:
        write_verified(folder, verified)


def read_verified(folder: Path) -> dict:
    try:
        record = json.loads((folder / VERIFIED).read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: every shard is checked once more


def write_verified(folder: Path, verified: dict) -> None:
    with contextlib.suppress(OSError):  # a read-only folder: checked again next time, never wrong
        write_json_atomic(folder / VERIFIED, verified)


def remember_written(folder: Path, shards: list[dict]) -> None:
    """The shards just written are the manifest's by construction: record them as checked."""
    verified = {}
    for shard in shards:
        stat = (folder / shard["name"]).stat()
        verified[shard["name"]] = [stat.st_size, stat.st_mtime_ns, shard["sha256"]]
    write_verified(folder, verified)


def iter_tar_samples(path: Path, only: tuple[str, ...] | None = None) -> Iterator[dict[str, bytes]]:
    """Samples of one shard as {"__key__": key, ext: bytes}, grouped by key in file order; with
    ``only``, just those extensions are read (the others, e.g. the images, are skipped unread).
    A tar that cannot be read to its end (cut short, damaged) is a `TaxoclipError` naming it."""
    current: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and current["__key__"] != key.encode():
                    yield current
                    current = {}
                current["__key__"] = key.encode()
                if only is not None and ext not in only:
                    continue
                handle = archive.extractfile(member)
                current[ext] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError) as error:
        raise TaxoclipError(
            f"{path}: unreadable tar ({error}); run 'taxoclip shards verify {Path(path).parent}' and rebuild the shards"
        ) from None
    if current:
        yield current


def sample_problem(sample: dict[str, bytes], needs_image: bool = True) -> str | None:
    """What makes a shard sample unusable, whoever reads it (None when it is whole): our writer
    gives every sample one image, its caption, its metadata as a JSON object with a split, and a
    class index; a crafted member (``.hidden.json``, ``../x.jpg``) groups under no key and lacks them."""
    image_keys = [k for k in IMAGE_KEYS if k in sample]
    missing = [k for k in ("json", "cls") if k not in sample]
    if not sample.get("__key__") or missing or (needs_image and len(image_keys) != 1):
        key = sample.get("__key__", b"").decode(errors="replace")
        return f"incomplete (key {key!r}, image parts {image_keys}, missing {missing})"
    try:
        int(sample["cls"])
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return "unreadable cls or json"
    if not isinstance(meta, dict) or not isinstance(meta.get("split"), str):
        return "its json names no split"
    return None


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(shard_dir: str | Path, *, decode: bool = False, progress: bool = True) -> VerifyReport:
    """Re-read every shard and check it against the manifest: checksums, sample structure, class
    indices and counts, no duplicate keys, and written + rejected = input."""
    out = Path(shard_dir)
    manifest = read_manifest(out)
    n_classes = len(manifest["classes"])
    report = VerifyReport()
    seen: set[str] = set()
    for shard in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
        path = out / shard["name"]
        report.shards += 1
        if not path.exists():
            report.problems.append(f"{shard['name']}: missing")
            continue
        if sha256_of(path) != shard["sha256"]:
            report.problems.append(f"{shard['name']}: checksum differs from the manifest (file changed or damaged)")
        counts: Counter = Counter()
        try:
            for sample in iter_tar_samples(path):
                key = sample["__key__"].decode()
                problem = check_sample(sample, n_classes, decode)
                if problem:
                    report.problems.append(f"{shard['name']}: sample {key}: {problem}")
                    continue
                if key in seen:
                    report.problems.append(f"{shard['name']}: sample {key} appears more than once")
                seen.add(key)
                counts[json.loads(sample["json"])["class"]["id"]] += 1
        except (TaxoclipError, OSError) as error:
            report.problems.append(f"{shard['name']}: unreadable tar, cut short or damaged ({type(error).__name__})")
            continue
        report.samples += sum(counts.values())
        if dict(counts) != shard["class_counts"]:
            report.problems.append(f"{shard['name']}: per-class counts differ from the manifest")
    totals = manifest["totals"]
    if report.samples != totals["written"]:
        report.problems.append(f"manifest says {totals['written']} samples were written, shards hold {report.samples}")
    if totals["written"] + totals["rejected"] != totals["input"]:
        report.problems.append(
            f"written {totals['written']} + rejected {totals['rejected']} != input {totals['input']}"
        )
    return report


def check_sample(sample: dict[str, bytes], n_classes: int, decode: bool) -> str | None:
    image_keys = [k for k in IMAGE_KEYS if k in sample]
    problem = sample_problem(sample)
    if problem or "txt" not in sample:
        return problem or f"incomplete (image parts {image_keys}, missing ['txt'])"
    class_index = int(sample["cls"])
    meta = json.loads(sample["json"])
    if not 0 <= class_index < n_classes or meta.get("class_index") != class_index:
        return f"class index {class_index} out of range or inconsistent"
    if decode:
        try:
            check_image(sample[image_keys[0]])
        except BadImage as error:
            return str(error)
    return None
