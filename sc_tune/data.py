"""Referring-box data: the annotation file, the dataset, the collator and the rollout sampler.

Annotation file: a JSON list of records ``{"image": path relative to the image folder,
"bbox": [x1, y1, x2, y2] normalised to [0, 1]}``; the reference's ``image_id`` key is accepted for
``image``, and extra keys (``caption``, ``category``) are kept. A bad record is an error that names the
file, the record's index and the field, unless the user asks for skipping, in which case it is counted and
reported. Images are decoded when a sample is drawn and never cached: a 2,400-step run touches 300k images.
Before step 0 every record's image is decoded once (``check_images``, threads in parallel) so that a missing,
truncated or unusable image stops the run before any work, or is skipped and counted with ``skip_bad``.

Images are opened by ``sc_tune.images.load_rgb``, the one conversion shared by the check, training, evaluation
and the converters (EXIF orientation, 16-bit grayscale, palettes, alpha: see that module).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from sc_tune import checks
from sc_tune.boxes import MIN_BOX_SIDE
from sc_tune.checks import AnnotationError
from sc_tune.images import (  # noqa: F401 (load_rgb: also imported from here)
    checked_image,
    displayed_size,
    load_rgb,
)
from sc_tune.jsonio import read_json
from sc_tune.phases import PhaseSchedule

logger = logging.getLogger(__name__)


def check_record(record, index: int, path: str) -> dict:
    """A clean copy of one annotation record, or an AnnotationError naming the file, index and field."""
    where = f"{path}: record {index}"
    if isinstance(record, dict) and "image" not in record and "image_id" in record:
        record = {("image" if k == "image_id" else k): v for k, v in record.items()}  # the reference's key
    image = checks.text(record, "image", where)
    clean = {k: v for k, v in record.items() if k != "image_id"}
    box = checks.normalised_box(record, "bbox", where)
    if min(box[2] - box[0], box[3] - box[1]) < MIN_BOX_SIDE:
        raise AnnotationError(
            f"{where}: field 'bbox' is a sliver (under 1/1000 of the image wide or high); got {record['bbox']!r}: "
            "no family's box grid (0..999, 0..1000) can write it with an area, so its IoU reward is meaningless "
            "(--skip_bad_records True skips such records and counts them)"
        )
    clean.update(image=image, bbox=box)
    return clean


def load_annotations(path: str, image_folder: str | None = None, skip_bad: bool = False) -> list[dict]:
    """Read and validate an annotation file; with ``skip_bad`` drop bad records (and missing images)."""
    raw = read_json(path)  # names the file when it is missing, not UTF-8 or not JSON
    if not isinstance(raw, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    records, skipped = [], defaultdict(list)
    for index, record in enumerate(raw):
        try:
            clean = check_record(record, index, path)
            if skip_bad and image_folder is not None and not os.path.isfile(os.path.join(image_folder, clean["image"])):
                raise AnnotationError(f"{path}: record {index}: image not found: {clean['image']}")
        except AnnotationError as e:
            if not skip_bad:
                raise
            skipped[str(e).split(": ", 2)[-1].split(",")[0][:60]].append(index)
            continue
        records.append({**clean, "record_index": index})  # the index in the file, for messages after skipping
    report_skipped(path, skipped, len(raw))
    if not records:
        raise AnnotationError(f"{path}: no usable records")
    report_duplicates(path, records)
    return records


def report_duplicates(path: str, records: list[dict]) -> None:
    """Warn about records that repeat an earlier one's image and box (kept: a repeat may be deliberate weighting, but
    it weighs twice in training and counts twice in an evaluation's metrics), by their indices in the file."""
    first: dict[tuple, int] = {}  # (image, box) -> the index in the file of its first record
    repeats = []
    for i, record in enumerate(records):
        key, index = (record["image"], tuple(record["bbox"])), record.get("record_index", i)
        if key in first:
            repeats.append(f"{index} (= {first[key]})")
        else:
            first[key] = index
    if repeats:
        logger.warning("%s: %d record(s) repeat an earlier record's image and box, and weigh (count) once more each: "
                       "records %s%s; kept as given (remove them unless the weighting is meant)", path, len(repeats),
                       ", ".join(repeats[:10]), ", ..." if len(repeats) > 10 else "")


def report_skipped(path: str, skipped: dict[str, list[int]], total: int | None) -> None:
    """Log skipped records per reason, with their indices in the annotation file."""
    if skipped:
        count = sum(len(v) for v in skipped.values())
        detail = "; ".join(
            f"{reason}: {len(idx)} (records {', '.join(map(str, idx[:10]))}{', ...' if len(idx) > 10 else ''})"
            for reason, idx in skipped.items()
        )
        of = f"of {total} records" if total is not None else "records for their image"
        logger.warning("%s: skipped %d %s: %s", path, count, of, detail)


def check_images(
    records: list[dict],
    image_folder: str,
    source: str,
    skip_bad: bool = False,
    size_problem: Callable[[int, int], str | None] | None = None,
    workers: int | None = None,
) -> list[dict]:
    """Decode every record's image once, in parallel, before training. Errors name file, record and field;
    with ``skip_bad`` bad records are dropped and counted per reason with their original indices. Each kept record
    gets its image's SHA-256 (``image_sha256``, from the same read: ``images_digest``)."""
    paths = sorted({r["image"] for r in records})
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    # Each distinct file is decoded once; PIL and hashlib release the GIL, so threads scale.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(lambda p: checked_image(os.path.join(image_folder, p), size_problem), paths)
        checked = dict(zip(paths, found))
    problems = {path: problem for path, (problem, _) in checked.items()}
    kept, skipped = [], defaultdict(list)
    for record in records:
        problem, digest = checked[record["image"]]
        if problem is None:
            kept.append({**record, "image_sha256": digest})
        elif skip_bad:
            skipped[problem.split(" (")[0]].append(record["record_index"])
        else:
            bad = [r for r in records if problems[r["image"]] is not None]
            listed = "; ".join(f"record {r['record_index']}: {r['image']}: {problems[r['image']]}" for r in bad[:5])
            raise AnnotationError(
                f"{source}: {len(bad)} record(s) with a bad field 'image' in {image_folder}: {listed}"
                f"{'; ...' if len(bad) > 5 else ''} (--skip_bad_records True skips them; --check_images False "
                "turns this check off)"
            )
    report_skipped(source, skipped, None)
    if not kept:
        raise AnnotationError(f"{source}: no record has a usable image")
    return kept


def boxes_mostly_unseen(records: list[dict], image_folder: str,
                        visible_region: Callable[[int, int], tuple[float, float, float, float] | None],
                        workers: int | None = None) -> int:
    """How many records' boxes lie mostly (over half their area) outside the part of their image the model sees
    (``adapter.visible_region``: LLaVA-1.5's center crop). Reads only the image headers, and none for a family that
    sees whole images (it sees all of a 1 x 4 and a 4 x 1 one)."""
    if visible_region(1, 4) is None and visible_region(4, 1) is None:
        return 0
    paths = sorted({r["image"] for r in records})
    with ThreadPoolExecutor(max_workers=workers or min(32, 4 * (os.cpu_count() or 1))) as pool:
        regions = dict(zip(paths, pool.map(lambda p: visible_region(*displayed_size(os.path.join(image_folder, p))),
                                           paths)))
    unseen = 0
    for record in records:
        region = regions[record["image"]]
        if region is None:
            continue
        x1, y1, x2, y2 = record["bbox"]
        inside = (max(0.0, min(x2, region[2]) - max(x1, region[0]))
                  * max(0.0, min(y2, region[3]) - max(y1, region[1])))
        unseen += inside < 0.5 * (x2 - x1) * (y2 - y1)
    return unseen


class ReferringDataset(Dataset):
    """One (image, box) per item; the image is decoded on access."""

    def __init__(self, records: list[dict], image_folder: str, source: str = "<records>"):
        self.records = records
        self.image_folder = image_folder
        self.source = source

    @classmethod
    def from_file(
        cls,
        path: str,
        image_folder: str,
        skip_bad: bool = False,
        check: bool = False,
        size_problem: Callable[[int, int], str | None] | None = None,
    ) -> ReferringDataset:
        return cls.from_records(cls.read_records(path, image_folder, skip_bad, check), image_folder, path, skip_bad,
                                check, size_problem)

    @staticmethod
    def read_records(path: str, image_folder: str, skip_bad: bool = False, check: bool = False) -> list[dict]:
        """The annotation file's records, before any image is opened (``from_records`` takes them on)."""
        # With the image check, missing files are one of its reasons (counted there, with the others).
        return load_annotations(path, None if check else image_folder, skip_bad)

    @classmethod
    def from_records(
        cls,
        records: list[dict],
        image_folder: str,
        path: str,
        skip_bad: bool = False,
        check: bool = False,
        size_problem: Callable[[int, int], str | None] | None = None,
    ) -> ReferringDataset:
        """The dataset of ``read_records``' records, their images checked with ``check`` (finetune.py reads the records
        before the model loads; the images' size check needs the family's adapter)."""
        if check:
            records = check_images(records, image_folder, path, skip_bad, size_problem)
        return cls(records, image_folder, path)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        record = self.records[index]
        image_path = os.path.join(self.image_folder, record["image"])
        try:
            return load_rgb(image_path)
        except (OSError, ValueError) as e:
            where = f"{self.source}: record {record.get('record_index', index)}"
            raise OSError(f"{where}: field 'image': cannot read {image_path} ({e})") from e

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "image": self.load_image(index), "bbox": self.records[index]["bbox"]}


def collate_referring(samples: list[dict]) -> dict:
    """Keep PIL images as a list: the model adapter preprocesses them once per rollout."""
    return {
        "index": [s["index"] for s in samples],
        "images": [s["image"] for s in samples],
        "boxes": torch.tensor([s["bbox"] for s in samples], dtype=torch.float32),
    }


def check_fills_a_step(num_records: int, source: str, per_device_batch: int, grad_accum: int, world_size: int,
                       skipped: str | None = None) -> None:
    """Refuse data too small for one optimizer step: every step draws ``per_device_batch x grad_accum x
    world_size`` distinct records (``RolloutSampler``; ``--num_generations`` samples K captions per record and needs no
    more records). An AnnotationError naming the file, the count (``skipped``: what was left out, counted in the log)
    and the arithmetic, before any training."""
    step = per_device_batch * grad_accum * world_size
    if num_records < step:
        raise AnnotationError(
            f"{source}: {num_records} usable record(s){f' (after skipping {skipped})' if skipped else ''} cannot "
            f"fill one training step of {step} records "
            f"(--per_device_train_batch_size {per_device_batch} x --gradient_accumulation_steps {grad_accum} x "
            f"{world_size} process(es)); add records, or lower the batch size or the gradient accumulation"
        )


def records_digest(records: list[dict]) -> str:
    """A digest of the training records as the sampler indexes them: each one's image and box, in order (what two
    processes, or a run and its resume, must share to draw the same batches)."""
    listed = json.dumps([(record["image"], record["bbox"]) for record in records]).encode()
    return hashlib.sha256(listed).hexdigest()[:16]


def images_digest(records: list[dict]) -> str | None:
    """A digest of the bytes of the records' images (their ``image_sha256``, from the image check), or None where they
    were not checked (``--check_images False``): what a resume compares to tell other image files under the same
    names (records_digest compares the names)."""
    if not records or any("image_sha256" not in record for record in records):
        return None
    listed = json.dumps(sorted({(record["image"], record["image_sha256"]) for record in records})).encode()
    return hashlib.sha256(listed).hexdigest()[:16]


def check_same_records_on_every_rank(dataset: ReferringDataset) -> None:
    """Refuse training records that differ between processes.

    Every process reads the annotation file and checks its images itself, so nodes that see different files (another
    image folder, an image missing from one node's disk and skipped there with ``--skip_bad_records``) each hold
    another list, and the sampler's indices then name other records on each node: a silently inconsistent run. An
    AnnotationError naming the ranks and their counts, before any training (one all-gather of a digest)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), len(dataset), records_digest(dataset.records),
                                   images_digest(dataset.records)))
    if len({digest for _, _, digest, _ in views}) == 1:
        if len({images for _, _, _, images in views}) == 1:
            return
        differ = ", ".join(f"rank {rank} on {host}" for rank, (host, _, _, images) in enumerate(views)
                           if images != views[0][3])
        raise AnnotationError(
            f"{dataset.source}: the processes hold the same training records but other image files under the same "
            f"names ({differ} against rank 0 on {views[0][0]}: the images' bytes differ). Give every node the same "
            "image folder (a copy that is complete and not re-encoded)"
        )
    counts = "; ".join(f"rank {rank} on {host}: {count}" for rank, (host, count, digest, _) in enumerate(views)
                       if rank == 0 or digest != views[0][2])
    raise AnnotationError(
        f"{dataset.source}: the processes hold different training records ({counts} records; the ranks not named "
        "hold rank 0's). Each node reads the annotation file and its images itself: give every node the same data "
        "and image folder (an image missing on one node is skipped there with --skip_bad_records)"
    )


@dataclass
class RolloutSampler(Sampler[int]):
    """Endless index stream where each describer rollout's batch comes back ``ppo_epochs`` times.

    It yields one *global* step's worth of indices at a time (``world_size * per_device_batch *
    grad_accum``); accelerate then deals micro-batches to ranks in turn, so a repeated chunk gives every
    rank the same micro-batches again, and the trainer reuses its buffered rollout for them. Epochs are
    reshuffled with ``seed + epoch``. The stream depends only on the step, which makes resume exact.
    """

    num_samples: int
    step_batch_size: int
    schedule: PhaseSchedule
    seed: int = 0

    def _chunks(self):
        for epoch in itertools.count():
            order = torch.randperm(
                self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)
            ).tolist()
            for start in range(0, self.num_samples - self.step_batch_size + 1, self.step_batch_size):
                yield order[start : start + self.step_batch_size]
            if self.num_samples < self.step_batch_size:
                raise ValueError(f"{self.num_samples} samples cannot fill one step of {self.step_batch_size}")

    def __iter__(self):
        chunks = self._chunks()
        chunk = None
        for step in itertools.count():
            if self.schedule.at(step).needs_rollout:
                chunk = next(chunks)
            yield from chunk
