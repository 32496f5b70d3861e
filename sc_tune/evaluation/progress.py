"""Scored samples are kept as they are scored, and a re-run resumes them: no evaluation work is lost.

While an evaluation runs, every process appends each scored batch to ``OUT/<name>_samples.partial/rank<R>.jsonl``
(one ``{"index": i, "row": {...}}`` per line, flushed and fsynced per batch), next to ``settings.json``: what the
rows were scored with (task, model files, the exact list of records, image folder, box format, dtype, generation
settings). A re-run with the same settings reads every rank's rows (whatever the number of processes was), scores
only the samples not yet there, and gathers both. A row cut off by a kill mid-write is dropped and scored again,
and its cut-off bytes are cut from the file before new rows are appended: the file always ends in whole lines.
Partial rows from other settings are never mixed in: that is an error naming the settings that differ.

When every sample is scored, rank 0 writes ``<name>_samples.jsonl`` and the task's metrics file and the partial
folder goes. A folder that already holds the task's metrics is refused (:func:`refuse_finished`) unless
``--overwrite_results`` asks to replace it (:func:`discard_results`, called once every input has been checked).
The metrics file is written atomically; one that is not valid JSON beside the task's partial rows (from a kill while
an earlier version wrote it) is an unfinished evaluation: it resumes from the rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from sc_tune.evaluation.distributed import Ranks, barrier
from sc_tune.jsonio import write_json

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"


class ResultsError(RuntimeError):
    """The output folder holds results this evaluation must not overwrite or mix with; the message says which."""


def fingerprint_records(records: list[dict]) -> str:
    """SHA-256 of the records as evaluated (after --max_samples and skipping): rows are indices into this list."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_identity(model_dir: str) -> dict:
    """The model folder as it is now: its path and each weight, config, tokenizer and template file's size and
    modification time (a template edited between an interruption and its resume scores the rest differently)."""
    files = {}
    if os.path.isdir(model_dir):
        for name in sorted(os.listdir(model_dir)):
            if name.endswith((".safetensors", ".bin", ".json", ".jinja", ".txt", ".model", ".tiktoken")):
                stat = os.stat(os.path.join(model_dir, name))
                files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"path": os.path.abspath(model_dir), "files": files}


def _partial_folders(metrics_path: str) -> list[str]:
    """The partial-row folders of the task whose metrics file this is (``<task>_metrics.json``): the task's own
    (``<task>_samples.partial``) or one per data file (``rec_<file>_samples.partial``)."""
    folder = os.path.dirname(metrics_path) or "."
    task = os.path.basename(metrics_path).removesuffix("_metrics.json")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith("_samples.partial") and (name == f"{task}_samples.partial"
                                                            or name.startswith(f"{task}_"))
                  and os.path.isdir(os.path.join(folder, name)))


def _unreadable_json(path: str) -> str | None:
    """Why the file at ``path`` is not valid JSON (cut off, empty, not UTF-8), or None if it is."""
    try:
        with open(path, "rb") as f:
            json.loads(f.read())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return str(e) or type(e).__name__
    return None


def refuse_finished(metrics_path: str, overwrite: bool) -> None:
    """An evaluation that finished into this folder is not replaced silently. A metrics file that is not valid JSON
    beside the task's partial rows was cut off while being written: the evaluation did not finish, it resumes."""
    if os.path.exists(metrics_path) and not overwrite:
        partial = _partial_folders(metrics_path)
        why = _unreadable_json(metrics_path) if partial else None
        if why is not None:
            logger.warning("%s is not valid JSON (%s), and the scored rows are still in %s: the evaluation did not "
                           "finish (cut off while writing its metrics); resuming from those rows, the file will be "
                           "replaced", metrics_path, why, ", ".join(partial))
            return
        raise ResultsError(
            f"{metrics_path} holds a finished evaluation: pass --overwrite_results True to replace it (its metrics "
            "and per-sample rows), or choose another --output_dir"
        )


def discard_results(paths: list[str]) -> None:
    """--overwrite_results: remove the earlier results and partial rows (after every input has been checked)."""
    for path in paths:
        if os.path.isdir(path):
            logger.warning("--overwrite_results: deleting %s", path)
            shutil.rmtree(path)
        elif os.path.exists(path):
            logger.warning("--overwrite_results: deleting %s", path)
            os.remove(path)


def _parse_entry(line: bytes | str) -> tuple[int, dict]:
    """``(index, row)`` of one line of a partial file; ValueError/KeyError/TypeError if it is not a whole entry."""
    entry = json.loads(line)
    return int(entry["index"]), entry["row"]


def _end_in_whole_lines(path: str) -> None:
    """Make the rows file at ``path`` end in whole lines before rows are appended to it: a last line cut off by a kill
    mid-write (not a whole entry) is cut off the file; a whole entry that lost only its newline gets it back."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back block by block for the last newline (rows files can be long; the tail is one row).
        start, block = size, 1 << 16
        while start > 0:
            start = max(0, start - block)
            f.seek(start)
            chunk = f.read(min(block, size - start))
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start += cut + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            _parse_entry(tail)
        except (ValueError, KeyError, TypeError):
            f.truncate(start)  # every complete line before it is kept
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


class SampleLog:
    """The partial rows of one evaluated file (``name``: e.g. ``self_consistency``, ``rec_refcoco_val``)."""

    def __init__(self, output_dir: str, name: str, settings: dict, ranks: Ranks, stop=None):
        # stop: a sc_tune.preemption.RecordsSignal; a signal it records stops every rank after the same batch, with
        # that batch's rows here (sc_tune.evaluation.runner.run_sharded)
        self.stop = stop
        self.folder = os.path.join(output_dir, f"{name}_samples.partial")
        self.final_path = os.path.join(output_dir, f"{name}_samples.jsonl")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        self.ranks = ranks
        self._file = None
        self.resumed = 0

    # ------------------------------------------------------------------ start
    def open(self) -> dict[int, dict]:
        """Check or write the settings, then return the rows already scored (by any rank), by index."""
        settings_path = os.path.join(self.folder, SETTINGS_FILE)
        self._check_same_on_every_rank()
        if self.ranks.is_main:
            os.makedirs(self.folder, exist_ok=True)
            if os.path.exists(settings_path):
                self._check_settings(settings_path)
            else:
                write_json(settings_path, self.settings, indent=1)  # atomic: a kill leaves none or the whole file
        barrier(self.ranks)
        if not self.ranks.is_main:
            self._check_settings(settings_path)
        done = self._read_rows()
        barrier(self.ranks)  # every rank has read the rows before any appends new ones
        own = os.path.join(self.folder, f"rank{self.ranks.rank}.jsonl")
        _end_in_whole_lines(own)  # each rank its own file: a new row never lands on a cut-off one
        self._file = open(own, "a", encoding="utf-8")
        self.resumed = len(done)
        if done and self.ranks.is_main:
            logger.info("%s: resuming, %d sample(s) already scored", self.folder, len(done))
        return done

    def _check_same_on_every_rank(self) -> None:
        """Every node runs its own command: one with another MAX_SAMPLES, DATA or MODEL scores other samples. Found
        by the settings file alone, that node was told its (new) folder held "samples scored with other settings" and
        to pass --overwrite_results, while rank 0 failed on a closed connection. Compared first, on every rank."""
        if not self.ranks.active:
            return
        import socket

        import torch.distributed as dist

        views: list = [None] * self.ranks.world_size
        dist.all_gather_object(views, (socket.gethostname(), self.settings))
        differ = sorted({k for _, settings in views for k in settings.keys() | views[0][1].keys()
                         if settings.get(k) != views[0][1].get(k)})
        if differ:
            ranks = ", ".join(f"rank {rank} on {host}" for rank, (host, settings) in enumerate(views)
                              if settings != views[0][1])
            raise ResultsError(
                f"the processes evaluate with different settings ({', '.join(differ)} differ: {ranks} against rank 0 "
                f"on {views[0][0]}): every node must run the same command (scripts/evaluate.sh: the same MODEL, "
                "DATA, MAX_SAMPLES, ... on each; only NODE_RANK differs)"
            )

    def _check_settings(self, settings_path: str) -> None:
        with open(settings_path, encoding="utf-8") as f:
            saved = json.load(f)
        differ = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
        if differ:
            raise ResultsError(
                f"{self.folder} holds samples scored with other settings ({', '.join(differ)} differ): pass "
                "--overwrite_results True to discard them and start again, or choose another --output_dir"
            )

    def _read_rows(self) -> dict[int, dict]:
        done: dict[int, dict] = {}
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith("rank") and name.endswith(".jsonl")):
                continue
            path = os.path.join(self.folder, name)
            with open(path, "rb") as f:  # bytes: a kill may cut a line inside a multi-byte character
                lines = f.read().split(b"\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    index, row = _parse_entry(line)
                except (ValueError, KeyError, TypeError) as e:
                    if number >= len(lines) - 1:  # the last line, cut off by a kill mid-write: score it again
                        logger.warning("%s: line %d is incomplete (interrupted write); its sample is scored again",
                                       path, number)
                        continue
                    raise ResultsError(f"{path}: line {number} is not a scored sample ({e}); delete that line (its "
                                       "sample is scored again, every other row is kept), remove the file or pass "
                                       "--overwrite_results True") from None
                done[int(index)] = row
        return done

    # ------------------------------------------------------------------ while scoring
    def append(self, pairs) -> None:
        """Rows of one scored batch, written and flushed to disk before the next batch starts."""
        self._file.write("".join(json.dumps({"index": i, "row": row}, ensure_ascii=False) + "\n" for i, row in pairs))
        self._file.flush()
        os.fsync(self._file.fileno())

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Every row is in the final samples file: the partial rows go (main process, after all ranks closed)."""
        self.close()
        barrier(self.ranks)
        if self.ranks.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
