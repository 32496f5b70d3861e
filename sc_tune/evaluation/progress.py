"""Scored samples are kept as they are scored, and a re-run resumes them: no evaluation work is lost.

While an evaluation runs, every process appends each scored batch to ``OUT/<name>_samples.partial/rank<R>.jsonl``
(one ``{"index": i, "row": {...}}`` per line, flushed and fsynced per batch), next to ``settings.json``: what the
rows were scored with (task, model files, the exact list of records, image folder, box format, dtype, generation
settings). A re-run with the same settings reads every rank's rows (whatever the number of processes was), scores
only the samples not yet there, and gathers both. A row cut off by a kill mid-write is dropped and scored again.
Partial rows from other settings are never mixed in: that is an error naming the settings that differ.

When every sample is scored, rank 0 writes ``<name>_samples.jsonl`` and the task's metrics file and the partial
folder goes. A folder that already holds the task's metrics is refused (:func:`refuse_finished`) unless
``--overwrite_results`` asks to replace it (:func:`discard_results`, called once every input has been checked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from sc_tune.evaluation.distributed import Ranks, barrier

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"


class ResultsError(RuntimeError):
    """The output folder holds results this evaluation must not overwrite or mix with; the message says which."""


def fingerprint_records(records: list[dict]) -> str:
    """SHA-256 of the records as evaluated (after --max_samples and skipping): rows are indices into this list."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_identity(model_dir: str) -> dict:
    """The model folder as it is now: its path and each weight/config file's size and modification time."""
    files = {}
    if os.path.isdir(model_dir):
        for name in sorted(os.listdir(model_dir)):
            if name.endswith((".safetensors", ".bin", ".json")):
                stat = os.stat(os.path.join(model_dir, name))
                files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"path": os.path.abspath(model_dir), "files": files}


def refuse_finished(metrics_path: str, overwrite: bool) -> None:
    """An evaluation that finished into this folder is not replaced silently."""
    if os.path.exists(metrics_path) and not overwrite:
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


class SampleLog:
    """The partial rows of one evaluated file (``name``: e.g. ``self_consistency``, ``rec_refcoco_val``)."""

    def __init__(self, output_dir: str, name: str, settings: dict, ranks: Ranks):
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
        if self.ranks.is_main:
            os.makedirs(self.folder, exist_ok=True)
            if os.path.exists(settings_path):
                self._check_settings(settings_path)
            else:
                tmp = settings_path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(self.settings, f, indent=1, ensure_ascii=False)
                os.replace(tmp, settings_path)
        barrier(self.ranks)
        if not self.ranks.is_main:
            self._check_settings(settings_path)
        done = self._read_rows()
        barrier(self.ranks)  # every rank has read the rows before any appends new ones
        self._file = open(os.path.join(self.folder, f"rank{self.ranks.rank}.jsonl"), "a", encoding="utf-8")
        self.resumed = len(done)
        if done and self.ranks.is_main:
            logger.info("%s: resuming, %d sample(s) already scored", self.folder, len(done))
        return done

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
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    index, row = entry["index"], entry["row"]
                except (ValueError, KeyError, TypeError) as e:
                    if number >= len(lines) - 1:  # the last line, cut off by a kill mid-write: score it again
                        logger.warning("%s: line %d is incomplete (interrupted write); its sample is scored again",
                                       path, number)
                        continue
                    raise ResultsError(f"{path}: line {number} is not a scored sample ({e}); remove the file or "
                                       "pass --overwrite_results True") from None
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
