"""The image-feature cache: one pass of the locked image tower over the data, stored for good.

LiT never changes the image tower, so its embeddings are computed once and every later step
(training, evaluation, baselines) reads them. A cache folder holds:

  features.npy   float16 (N, width), memory-mappable
  labels.npy     int32 class index per row
  splits.npy     uint8 split code per row (names in meta.json)
  keys.json      sample key per row (row = position)
  meta.json      cache key, tower, data it came from, class table, captions, rejects, timing

The cache key covers the tower id (name + weights + preprocessing) and the data (the shard
manifest, or every image path, size and mtime of a source), so a changed input is never served
stale features. Here: the format, its reading, the data plan and the photo loader; the pass of the
tower that fills a cache is `taxoclip.models.extraction.extract_features`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from taxoclip.data.device_decode import device_decodable, pixels_on_device
from taxoclip.data.images import IMAGE_KEYS, BadImage, decode_image, read_photo
from taxoclip.data.keyset import encoded, locate
from taxoclip.data.preprocess import Preprocess
from taxoclip.data.shards import MANIFEST, check_shard_files, iter_tar_samples, read_manifest, sample_problem
from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import KNOWN_SPLITS, ClassTable

CACHE_VERSION = 2  # 2: photos turned upright by EXIF, 16-bit grey scaled (caches from 1 are recomputed)
SOURCE_UNIT = 1000  # images per resumable unit when reading a source folder directly
STREAM_CHUNK = 65536  # rows a streamed pass over a split reads at a time (8 MB of float16 at 1,280-d)


@dataclass
class Unit:
    """A resumable piece of work: a shard, or a slice of a source's samples."""

    name: str
    count: int
    shard: str | None = None  # tar path
    samples: list[tuple[str, str, int, str]] = field(default_factory=list)  # (key, path, label, split)


@dataclass
class DataPlan:
    units: list[Unit]
    data_id: str
    classes: list[dict[str, str]]
    captions: dict | None
    description: dict
    rejects: list[dict] = field(default_factory=list)


def photo_set_id(description: dict, data_id: str) -> str:
    """Which photos, by identity, whatever subset of them a file covers: shards by their manifest's
    plan (so a cache of one split and questions about all splits still match), any other source by
    its content digest. A file that names another file's rows records this."""
    if description.get("kind") == "shards" and description.get("plan_id"):
        return f"shards:{description['plan_id']}"
    return f"data:{data_id}"


def plan_from_shards(shard_dir: Path, split: str | None) -> DataPlan:
    manifest = read_manifest(shard_dir)
    shards = [s for s in manifest["shards"] if split is None or s["split"] == split]
    if not shards:
        raise TaxoclipError(f"{shard_dir}: no shards{f' for split {split!r}' if split else ''}")
    check_shard_files(shard_dir, shards)
    units = [Unit(s["name"].removesuffix(".tar"), s["count"], shard=str(shard_dir / s["name"])) for s in shards]
    data_id = hashlib.sha256(json.dumps([manifest["plan_id"], [s["sha256"] for s in shards]]).encode()).hexdigest()
    return DataPlan(
        units,
        data_id[:16],
        manifest["classes"],
        manifest.get("captions"),
        {"kind": "shards", "path": str(shard_dir), "plan_id": manifest["plan_id"], "split": split},
    )


def plan_from_source(path: str, split: str | None, **source_options) -> DataPlan:
    from taxoclip.data.captions import build_captions
    from taxoclip.data.sources import load_source

    dataset = load_source(path, split=split, **source_options)
    if not dataset.samples:
        raise TaxoclipError(f"{path}: class metadata only, no images to embed")
    index_of = dataset.classes.index_of()
    samples = sorted(dataset.samples, key=lambda s: (s.split, s.path))
    digest = hashlib.sha256(json.dumps(dataset.classes.to_json()).encode())
    rows, rejects = [], []
    for position, sample in enumerate(samples):
        key = f"{sample.split}-{position:07d}"
        try:
            stat = os.stat(sample.path)
        except OSError as error:
            rejects.append({"key": key, "path": sample.path, "reason": f"cannot read: {error.strerror}"})
            continue
        digest.update(f"{sample.path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{sample.class_id}\n".encode())
        rows.append((key, sample.path, index_of[sample.class_id], sample.split))
    units = [
        Unit(f"part-{i // SOURCE_UNIT:06d}", len(rows[i : i + SOURCE_UNIT]), samples=rows[i : i + SOURCE_UNIT])
        for i in range(0, len(rows), SOURCE_UNIT)
    ]
    captions = build_captions(dataset.classes)
    return DataPlan(
        units,
        digest.hexdigest()[:16],
        dataset.classes.to_json(),
        {"config": captions.config(), "by_class": captions.by_class},
        {"kind": "source", "path": str(path), "split": split},
        rejects,
    )


def plan_data(path: str | Path, split: str | None = None, **source_options) -> DataPlan:
    path = Path(path)
    if (path / MANIFEST).exists():
        return plan_from_shards(path, split)
    return plan_from_source(str(path), split, **source_options)


class UnitImages(IterableDataset):
    """Decodes and preprocesses the images of the given units, split across DataLoader workers.
    With ``decode="device"`` a JPEG the device decoder takes is only probed (`device_decodable`)
    and travels as bytes (item["jpeg"]), for the main process to decode in batches on the device."""

    def __init__(
        self,
        units: list[Unit],
        preprocess: Preprocess,
        keep: Callable[[str], bool] | None = None,
        decode: str = "workers",
    ):
        self.units, self.preprocess, self.keep, self.decode = units, preprocess, keep, decode

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.units if info is None else self.units[info.id :: info.num_workers]
        try:
            yield from self.items(mine)
        except TaxoclipError as error:  # a worker's exception would reach the user as a traceback
            yield {"unit": "", "key": "", "pixels": None, "fatal": str(error)}

    def items(self, mine: list[Unit]) -> Iterator[dict]:
        for unit in mine:
            for key, data, label, split in unit_items(unit):
                if self.keep is not None and not self.keep(key):
                    continue  # another part's photo (e.g. the selection split): not decoded at all
                item = {"unit": unit.name, "key": key, "label": label, "split": split, "pixels": None, "reason": ""}
                try:
                    if isinstance(data, BadImage):
                        raise data
                    image = decode_image(data)  # opened once: the header decides where it is decoded
                    if self.decode == "device" and device_decodable(image):
                        item["jpeg"] = data  # bytes cross by pickle: no shared-memory handle per photo
                    else:
                        item["pixels"] = self.preprocess.to_uint8(image)
                except BadImage as error:
                    item["reason"] = str(error)
                except Exception as error:  # any decoder failure is a counted reject, never fatal
                    item["reason"] = f"cannot decode ({type(error).__name__}: {error})"
                yield item


def unit_items(unit: Unit) -> Iterator[tuple[str, bytes | BadImage, int, str]]:
    if unit.shard:
        for sample in iter_tar_samples(Path(unit.shard)):
            problem = sample_problem(sample)
            if problem:  # a counted reject under the shard's name, never a KeyError
                key = sample.get("__key__", b"").decode(errors="replace") or "(no key)"
                yield f"{Path(unit.shard).name}/{key}", BadImage(f"malformed shard sample: {problem}"), -1, ""
                continue
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            meta = json.loads(sample["json"])
            yield (
                sample["__key__"].decode(),
                sample.get(image_key, b"") if image_key else b"",
                int(sample["cls"]),
                meta["split"],
            )
    else:
        for key, path, label, split in unit.samples:
            try:
                data = read_photo(path)
            except BadImage as error:
                data = error  # the reason travels with the item and becomes a counted reject
            except OSError as error:
                data = BadImage(f"cannot read: {error.strerror}")
            yield key, data, label, split


def collate(items: list[dict]) -> dict:
    """One uint8 tensor for the batch's pixels, plus the items' metadata without pixels: each
    tensor that crosses from a worker costs a shared-memory handle, so only one per batch.
    Photos left for the device decoder ("encoded") still hold their JPEG bytes."""
    fatal = [i["fatal"] for i in items if "fatal" in i]
    items = [i for i in items if "fatal" not in i]
    encoded = [i for i in items if "jpeg" in i]
    bad = [i for i in items if i["pixels"] is None and "jpeg" not in i]
    good = [i for i in items if i["pixels"] is not None]
    pixels = torch.stack([i.pop("pixels") for i in good]) if good else None
    return {"pixels": pixels, "good": good, "bad": bad, "encoded": encoded, "fatal": fatal}


def batch_on_device(
    batch: dict, preprocess: Preprocess, device: torch.device
) -> tuple[torch.Tensor | None, list[dict], list[dict]]:
    """A loader batch's uint8 pixels on ``device``, the items they belong to (row order) and the
    rejects: the workers' decoded photos first, then those decoded here on the device."""
    pixels = [batch["pixels"].to(device, non_blocking=True)] if batch["pixels"] is not None else []
    good, bad = list(batch["good"]), list(batch["bad"])
    if batch["encoded"]:
        decoded, reasons = pixels_on_device([item.pop("jpeg") for item in batch["encoded"]], preprocess, device)
        if decoded is not None:
            pixels.append(decoded)
        for item, reason in zip(batch["encoded"], reasons, strict=True):
            if reason is None:
                good.append(item)
            else:
                bad.append(item | {"reason": reason})
    return (torch.cat(pixels) if pixels else None), good, bad


class CacheKeys(Sequence):
    """A cache's row keys as one fixed-width bytes array, read as strings: ~14 bytes a row where
    a list of Python strings takes ~70 (190 MB at iNat2021's 2.7M rows, held by every command
    that opens the cache)."""

    def __init__(self, keys: list[str]):
        self.array = encoded(keys)
        self._sorted: tuple[np.ndarray, np.ndarray | None] | None = None

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The cache row of each key (-1 where the cache has none), by binary search over the keys
        in sorted order: a dict of iNat2021's 2.7M keys would take ~350 MB, this ~20 MB (nothing
        when the keys are already sorted, as a cache written split by split usually is)."""
        if self._sorted is None:
            array = self.array
            if len(array) < 2 or bool(np.all(array[1:] >= array[:-1])):
                self._sorted = (array, None)
            else:
                order = np.argsort(array, kind="stable").astype(np.int32 if len(array) < 2**31 else np.int64)
                self._sorted = (array[order], order)
        ordered, order = self._sorted
        at, found = locate(ordered, keys)
        rows = at if order is None else order[at]
        return np.where(found, rows, -1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [k.decode() for k in self.array[index].tolist()]
        return self.array[index].decode()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.array), STREAM_CHUNK):
            yield from (k.decode() for k in self.array[start : start + STREAM_CHUNK].tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(self) != len(other):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # mutable-style equality, like the list it stands for


@dataclass
class FeatureCache:
    """Cached image embeddings with their labels, splits and keys; ``features`` is memory-mapped."""

    path: Path
    features: np.ndarray
    labels: np.ndarray
    split_codes: np.ndarray
    keys: CacheKeys  # a sequence of str
    meta: dict
    computed_now: bool = False  # False when this call served it from an earlier run

    @property
    def split_names(self) -> list[str]:
        return self.meta["split_names"]

    def split_mask(self, split: str) -> np.ndarray:
        if split not in self.split_names:
            raise TaxoclipError(f"{self.path}: no split {split!r} (have {', '.join(self.split_names)})")
        return self.split_codes == self.split_names.index(split)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features as float32, labels) of one split."""
        mask = self.split_mask(split)
        return np.asarray(self.features[mask], dtype=np.float32), self.labels[mask]

    def chunks(self, rows: np.ndarray, chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, their embeddings as float32) ``chunk`` rows at a time, read from the memory map in
        row order: how every pass over a split reads it, so memory never grows with the split."""
        chunk = chunk or STREAM_CHUNK
        for start in range(0, len(rows), chunk):
            part = np.sort(rows[start : start + chunk])
            yield part, self.read(part)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The embeddings of ``rows`` as float32, refused when any is NaN or infinite (a damaged
        cache): the check costs nothing beside the read, so every pass makes it."""
        features = np.asarray(self.features[rows], dtype=np.float32)
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            bad = np.asarray(rows).reshape(-1)[~finite]
            keys = ", ".join(self.keys[int(row)] for row in bad[:5])
            raise TaxoclipError(
                f"{self.path / 'features.npy'}: {len(bad)} rows hold NaN or infinite values (samples {keys}"
                f"{' ...' if len(bad) > 5 else ''}); the cache is damaged: delete the folder and run "
                "'taxoclip features'"
            )
        return features

    def mean(self, rows: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """The mean embedding of ``rows``, accumulated in float64 chunk by chunk."""
        total = np.zeros(self.features.shape[1], np.float64)
        for _, features in self.chunks(rows, chunk):
            total += features.sum(0, dtype=np.float64)
        return (total / max(1, len(rows))).astype(np.float32)

    @property
    def classes(self) -> ClassTable:
        return ClassTable.from_json(self.meta["classes"])

    @property
    def photo_set(self) -> str:
        """The identity of the photos this cache embedded (see `photo_set_id`)."""
        data = self.meta.get("data", {})
        return photo_set_id(data, str(data.get("data_id", "")))

    def row_of(self) -> dict[str, int]:
        return {key: row for row, key in enumerate(self.keys)}


def recorded_cache_key(meta_path: Path) -> str | None:
    """The cache key a meta.json records; None when it is cut short, damaged or not ours (a run
    killed while writing it, a full disk): such a cache is computed again, never trusted."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta.get("cache_key") if isinstance(meta, dict) else None


def load_features(path: str | Path) -> FeatureCache:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise TaxoclipError(f"{path}: not a feature cache (no meta.json); make one with 'taxoclip features'")
    redo = f"delete {path} and run 'taxoclip features' again"
    try:
        meta = json.loads(meta_path.read_text())
        cache = FeatureCache(
            path,
            np.load(path / "features.npy", mmap_mode="r"),
            np.load(path / "labels.npy"),
            np.load(path / "splits.npy"),
            CacheKeys(json.loads((path / "keys.json").read_text())),
            meta,
        )
    except (OSError, ValueError, EOFError) as error:  # missing, truncated or not-JSON parts
        raise TaxoclipError(f"{path}: the feature cache is damaged ({type(error).__name__}: {error}); {redo}") from None
    rows, classes = len(cache.features), len(meta.get("classes") or [])
    parts = {"labels.npy": len(cache.labels), "splits.npy": len(cache.split_codes), "keys.json": len(cache.keys)}
    uneven = [f"{name} has {n}" for name, n in parts.items() if n != rows]
    if uneven:
        raise TaxoclipError(f"{path}: features.npy has {rows} rows but {', '.join(uneven)}; {redo}")
    if rows and (cache.labels.min() < 0 or cache.labels.max() >= classes):
        raise TaxoclipError(f"{path}: labels.npy names classes outside the cache's {classes}; {redo}")
    return cache


def default_workers(device: torch.device | None = None) -> int:
    """Decoding processes. On CPU they share the cores with the forward pass (half each); with a
    GPU doing the forward, decoding is the bottleneck and gets all cores but two."""
    cores = os.cpu_count() or 2
    if device is not None and device.type == "cuda":
        return max(1, min(32, cores - 2))
    return max(1, min(8, cores // 2))


def image_loader(
    units: list[Unit],
    preprocess: Preprocess,
    batch_size: int,
    device: torch.device,
    workers: int | None = None,
    keep: Callable[[str], bool] | None = None,
    decode: str = "workers",
) -> Iterator[dict]:
    """Batches of decoded, preprocessed photos of ``units`` ({"pixels", "good", "bad",
    "encoded"}), decoded in worker processes (``decode="device"``: JPEGs left to
    `batch_on_device`): the one loader behind extraction and the trainers' image-in-loop paths.
    ``keep(key)`` (picklable) picks which photos are decoded at all."""
    workers = default_workers(device) if workers is None else workers
    loader = DataLoader(
        UnitImages(units, preprocess, keep, decode),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for batch in loader:
        if batch["fatal"]:  # a shard that cannot be read on: its message, raised here in the main process
            raise TaxoclipError(batch["fatal"][0])
        yield batch


def ordered_splits(names: set[str]) -> list[str]:
    return [s for s in KNOWN_SPLITS if s in names] + sorted(names - set(KNOWN_SPLITS))


class CacheWriter:
    """Writes a feature cache in bounded memory: rows are appended chunk by chunk into a
    memory-mapped features.npy (never held whole), keys streamed to keys.json; ``finish`` writes
    labels, splits and meta.json last (it marks the cache complete). The one writer behind
    extraction's merge and `write_synthetic_cache`."""

    def __init__(self, out: Path, total: int, width: int):
        self.out, self.total, self.row = Path(out), total, 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.features = np.lib.format.open_memmap(
            self.out / "features.npy.tmp.npy", mode="w+", dtype=np.float16, shape=(total, width)
        )
        self.labels = np.zeros(total, np.int32)
        self.splits: list[np.ndarray] = []
        self.split_names: list[str] = []
        self.keys = open(self.out / "keys.json.tmp", "w")  # noqa: SIM115 (closed in finish)
        self.keys.write("[")

    def add(self, features: np.ndarray, labels, splits: list[str], keys: list[str]) -> None:
        n = len(keys)
        if not (len(features) == len(labels) == len(splits) == n) or self.row + n > self.total:
            raise ValueError(f"uneven chunk ({len(features)}, {len(labels)}, {len(splits)}, {n}) at row {self.row}")
        self.features[self.row : self.row + n] = features
        self.labels[self.row : self.row + n] = labels
        for name in dict.fromkeys(splits):
            if name not in self.split_names:
                self.split_names.append(name)
        self.splits.append(np.array([self.split_names.index(s) for s in splits], dtype=np.uint8))
        self.keys.write(("," if self.row else "") + ",".join(json.dumps(k) for k in keys))
        self.row += n

    def finish(self, meta: dict) -> dict:
        """Write the rest; ``meta`` gains count, split names and counts. Returns the meta written."""
        if self.row != self.total:
            raise ValueError(f"{self.out}: {self.row} rows written of {self.total}")
        self.features.flush()
        del self.features
        self.keys.write("]")
        self.keys.close()
        order = ordered_splits(set(self.split_names))  # codes renumbered in the canonical order
        remap = np.array([order.index(s) for s in self.split_names] or [0], dtype=np.uint8)
        codes = remap[np.concatenate(self.splits)] if self.splits else np.zeros(0, np.uint8)
        np.save(self.out / "labels.npy", self.labels)
        np.save(self.out / "splits.npy", codes)
        os.replace(self.out / "keys.json.tmp", self.out / "keys.json")
        os.replace(self.out / "features.npy.tmp.npy", self.out / "features.npy")
        meta = {"version": CACHE_VERSION} | meta
        meta |= {
            "count": self.total,
            "split_names": order,
            "split_counts": {name: int((codes == i).sum()) for i, name in enumerate(order)},
        }
        (self.out / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the cache complete
        return meta


SYNTHETIC_RANK_WEIGHTS = (("order", 0.9), ("family", 0.7), ("genus", 0.5))  # shared by relatives


def synthetic_centres(classes: ClassTable, width: int, seed: int = 0, species_weight: float = 0.45) -> np.ndarray:
    """(classes, width) float32 class centres that follow the taxonomy: a species' centre is the
    sum of random directions of its order, family and genus (shared with its relatives) and its
    own, on a common positive offset (CNN embeddings are all positive, so centring matters)."""
    rng = np.random.default_rng([seed, 1])
    centres = np.full((len(classes), width), 0.5, np.float32)
    for rank, weight in SYNTHETIC_RANK_WEIGHTS:
        values = [row.get(rank, "") for row in classes]
        distinct = sorted(set(values) - {""})
        directions = rng.standard_normal((len(distinct) + 1, width), dtype=np.float32) / np.sqrt(width)
        directions[-1] = 0  # a class with no value at this rank shares nothing there
        position = {v: i for i, v in enumerate(distinct)}
        centres += weight * directions[[position.get(v, len(distinct)) for v in values]]
    centres += species_weight * rng.standard_normal(centres.shape, dtype=np.float32) / np.sqrt(width)
    return centres


def write_synthetic_cache(
    out: str | Path,
    classes: ClassTable,
    *,
    rows: int,
    valid_rows: int = 0,
    tower: dict,
    noise: float = 0.5,
    seed: int = 0,
    chunk: int = 65536,
    progress: bool = True,
) -> FeatureCache:
    """A feature cache in the real format (through `CacheWriter`, in bounded memory) with ``rows``
    train and ``valid_rows`` valid embeddings of ``classes``, drawn around `synthetic_centres` with
    Gaussian ``noise`` (per dimension, relative to a centre's spread): a right answer exists, so
    accuracy at scale means something. ``tower`` is the describe() of the tower the rows pretend
    to come from (e.g. EfficientNet-Lite0's, so models trained on them open real photos)."""
    from taxoclip.data.captions import build_captions

    out = Path(out)
    width = int(tower["width"])
    centres = synthetic_centres(classes, width, seed)
    captions = build_captions(classes)
    identity = {"synthetic": seed, "rows": rows, "valid": valid_rows, "noise": noise, "classes": classes.ids}
    data_id = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps({"tower": tower, "data": data_id}, sort_keys=True).encode()).hexdigest()[:16]
    if (out / "meta.json").exists() and recorded_cache_key(out / "meta.json") == key:
        return load_features(out)
    writer = CacheWriter(out, rows + valid_rows, width)
    bar = tqdm(total=rows + valid_rows, unit="row", desc="synthetic cache", disable=not progress)
    for split, count in (("train", rows), ("valid", valid_rows)):
        for index, start in enumerate(range(0, count, chunk)):
            n = min(chunk, count - start)
            rng = np.random.default_rng([seed, 2, KNOWN_SPLITS.index(split), index])
            labels = rng.integers(0, len(classes), n)
            features = centres[labels] + noise * rng.standard_normal((n, width), dtype=np.float32) / np.sqrt(width)
            keys = [f"{split}-{start + i:08d}" for i in range(n)]
            writer.add(features.astype(np.float16), labels, [split] * n, keys)
            bar.update(n)
    bar.close()
    writer.finish(
        {
            "cache_key": key,
            "tower": tower,
            "data": {"kind": "synthetic", "seed": seed, "noise": noise, "data_id": data_id},
            "rejected": 0,
            "rejects": [],
            "classes": classes.to_json(),
            "captions": {"config": captions.config(), "by_class": captions.by_class},
            "seconds": 0.0,
            "ranks": [{"rank": 0, "units": []}],
        }
    )
    return load_features(out)
