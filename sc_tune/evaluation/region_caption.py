"""Region captioning: the describer's greedy caption of each given box, scored against reference captions
with BLEU-1..4 and CIDEr-D (Python) and METEOR (Java, when available; otherwise reported as skipped)."""

from __future__ import annotations

from collections.abc import Sequence

from sc_tune.evaluation.caption_metrics import caption_scores, cider_d
from sc_tune.evaluation.distributed import broadcast_from_main
from sc_tune.evaluation.progress import SampleLog
from sc_tune.evaluation.records import check_region_caption_records, open_image
from sc_tune.evaluation.runner import DESCRIBE_EVAL, eval_mode, run_sharded
from sc_tune.rollout import GenerationSettings, describe


def evaluate_region_captions(model, adapter, records: Sequence[dict], image_root, batch_size: int = 8,
                             describe_settings: GenerationSettings = DESCRIBE_EVAL,
                             distributed: bool | None = None, use_meteor: bool = True,
                             progress: SampleLog | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample results) for records ``{"image", "bbox" normalised, "captions": [refs]}``.

    Corpus scores are computed once, on rank 0 (CIDEr-D needs the whole corpus; METEOR starts a JVM),
    and shared with every rank. Per-sample dicts: index, image, bbox, caption, references, cider_d.
    """
    records = check_region_caption_records(records)

    def score_batch(indices):
        images = [adapter.prepare_image(open_image(image_root, records[i]["image"], i)) for i in indices]
        _, captions = describe(model, adapter, images, [records[i]["bbox"] for i in indices], describe_settings)
        return [{"index": i, "image": records[i]["image"], "bbox": records[i]["bbox"], "caption": text,
                 "references": records[i]["captions"]} for i, text in zip(indices, captions.texts)]

    with eval_mode(model):
        per_sample, ranks = run_sharded(len(records), batch_size, score_batch, distributed, "region-caption", progress)
    metrics, per_sample_cider = None, None
    if ranks.is_main:
        candidates = [s["caption"] for s in per_sample]
        references = [s["references"] for s in per_sample]
        metrics = caption_scores(candidates, references, use_meteor=use_meteor)
        per_sample_cider = cider_d(candidates, references)[1] if per_sample else []
    metrics, per_sample_cider = broadcast_from_main((metrics, per_sample_cider), ranks)
    for s, score in zip(per_sample, per_sample_cider):
        s["cider_d"] = score
    metrics["num_records"] = len(records)
    metrics["num_empty_captions"] = sum(1 for s in per_sample if not s["caption"].strip())
    metrics["world_size"] = ranks.world_size
    return metrics, per_sample
