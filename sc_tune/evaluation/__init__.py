"""Evaluation: self-consistency, REC (RefCOCO/+/g) and region captioning, sharded across ranks."""

from sc_tune.evaluation.rec import evaluate_rec
from sc_tune.evaluation.region_caption import evaluate_region_captions
from sc_tune.evaluation.self_consistency import evaluate_self_consistency

__all__ = ["evaluate_rec", "evaluate_region_captions", "evaluate_self_consistency"]
