"""The two roles as batched generation: the describer captions boxes, the locator grounds captions.

These functions take an *unwrapped* model (the trainer gathers ZeRO-3 shards around them) and never
compute gradients. The trainer, the evaluator and the benchmark all call them, so a cycle is the same
computation everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from sc_tune.adapters.base import ImageInputs, ModelAdapter, PromptBatch
from sc_tune.decoding import Decoding, SampledRows, make_decode_loop, static_cache_fits, static_cache_from
from sc_tune.prompt_cache import ScoredPrompts, prompt_rows_cache, shared_prefix_batch


@dataclass(frozen=True)
class GenerationSettings:
    """How one role decodes. Greedy unless ``do_sample``."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0

    def generate_kwargs(self) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": 1,
        }
        if self.do_sample:
            kwargs.update(top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)
        else:  # do not let a checkpoint's generation_config.json sneak sampling knobs into greedy decoding
            kwargs.update(top_k=None, top_p=None, temperature=None)
        return kwargs


@dataclass
class Completions:
    """Generated continuations of a prompt batch."""

    ids_BT: torch.Tensor  # new tokens; positions after the first end token hold padding
    mask_BT: torch.Tensor  # 1 on new tokens up to and including the first end token
    texts: list[str]
    # generate(keep_prompt_rows=...): those rows' key/value cache of their prompt, all but its last column
    prompt_cache: Cache | None = None


    def rows(self, start: int, end: int) -> Completions:
        """Rows ``start:end``, cut to their longest completion (the width a call of these rows alone returns)."""
        mask_BT = self.mask_BT[start:end]
        width = int(mask_BT.sum(dim=1).max()) if end > start else 0
        return Completions(self.ids_BT[start:end, :width], mask_BT[:, :width], self.texts[start:end])


@dataclass
class Cycle:
    """Describer -> locator for a batch of boxes: the captions, the re-grounded boxes and their text."""

    describer_batch: PromptBatch
    captions: Completions
    boxes: list[list[float] | None]  # None where the locator's text held no box (a parse failure)
    locator_texts: list[str]


def completion_mask(ids_BT: torch.Tensor, end_token_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first end token of each row, 0 after it."""
    is_end_BT = torch.isin(ids_BT, torch.tensor(list(end_token_ids), device=ids_BT.device))
    ended_before_BT = (is_end_BT.cumsum(dim=1) - is_end_BT.long()) > 0
    return (~ended_before_BT).long()


# The box a codec writes longest: every coordinate at its maximum (1000 on a grid, the frame on pixels).
_WIDEST_BOX = (1.0, 1.0, 1.0, 1.0)
# Tokens the locator may write beyond the widest documented answer (to the end of its box): room for layouts and
# spacing the documentation does not show. Generation stops once the box is complete (BoxCompleteStop), so the
# margin costs no decoding steps when the answer is well formed.
LOCATOR_BUDGET_MARGIN = 8


@dataclass(frozen=True)
class WidestAnswer:
    tokens: int  # tokens of ``text``, counted with the adapter's tokenizer
    text: str  # the widest documented answer layout, up to the end of its box


def widest_locator_answer(adapter: ModelAdapter, image: ImageInputs, caption: str = "") -> WidestAnswer:
    """The longest of the family's documented answer layouts (``locator_answer_layouts``) for ``caption`` on
    ``image``, every coordinate at its widest, cut where its box is complete (what the locator must write before
    generation stops), counted with the family's tokenizer."""
    widest = WidestAnswer(0, "")
    for layout in adapter.locator_answer_layouts(_WIDEST_BOX, image, caption):
        end = adapter.locator_answer_end(layout)
        if end is None:
            raise ValueError(f"{type(adapter).__name__}: its answer layout holds no complete box: {layout!r}")
        text = layout[:end]
        tokens = len(adapter.encode_target(text))
        if tokens > widest.tokens:
            widest = WidestAnswer(tokens, text)
    return widest


def locator_budget(adapter: ModelAdapter, images: Sequence[ImageInputs], captions: Sequence[str] | None = None) -> int:
    """New tokens the locator needs for these images (and captions, where the answer repeats them before the box):
    the widest documented answer up to its box's end, plus ``LOCATOR_BUDGET_MARGIN``."""
    captions = [""] * len(images) if captions is None else captions
    return max(widest_locator_answer(adapter, im, c).tokens for im, c in zip(images, captions)) + LOCATOR_BUDGET_MARGIN


def fit_locator_budget(
    adapter: ModelAdapter, images: Sequence[ImageInputs], settings: GenerationSettings,
    captions: Sequence[str] | None = None,
) -> GenerationSettings:
    """``settings`` with ``max_new_tokens`` raised, if needed, to :func:`locator_budget`.

    Why: the reference's 20 tokens were sized for Qwen-VL's ``(x1,y1),(x2,y2)</box>``. A released Qwen2.5-VL
    answers with a fenced JSON list (31-33 tokens of the real Qwen vocabulary up to the box's closing bracket), so
    a budget sized for anything shorter cuts nearly every answer off: parse failures, rewards of 0 and no
    advantage. The budget is counted on the family's own documented answer forms with the loaded tokenizer.
    """
    needed = locator_budget(adapter, images, captions)
    if needed <= settings.max_new_tokens:
        return settings
    return dataclasses.replace(settings, max_new_tokens=needed)


def describer_budget(adapter: ModelAdapter, caption_tokens: int) -> int:
    """New tokens the describer needs for a caption of ``caption_tokens``: the caption plus what the family's
    answer form adds around it (``describer_target``: the end token)."""
    probe = "the red circle"
    return caption_tokens + len(adapter.encode_target(adapter.describer_target(probe))) - len(
        adapter.encode_target(probe))


def fit_describer_budget(adapter: ModelAdapter, settings: GenerationSettings) -> GenerationSettings:
    """``settings`` whose ``max_new_tokens`` (the caption's length) makes room for the answer form around it."""
    return dataclasses.replace(settings, max_new_tokens=describer_budget(adapter, settings.max_new_tokens))


class BoxCompleteStop(StoppingCriteria):
    """Stops a locator row once its answer holds a complete box (``ModelAdapter.locator_answer_end``).

    Why: the released answer forms go on after the box (Qwen's ``"label": "..."}\n]\n```), which the box does
    not need; stopping there spares those decoding steps and keeps a long label from eating the budget. Records
    how many tokens each row had when it stopped (``stopped_at``), so that :func:`generate` masks the padding
    that follows."""

    def __init__(self, adapter: ModelAdapter, prompt_width: int):
        self.adapter, self.prompt_width = adapter, prompt_width
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids, scores, **kwargs):
        new_BT = input_ids[:, self.prompt_width :]
        done = [row in self.stopped_at or self.row_done(row, ids) for row, ids in enumerate(new_BT.tolist())]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def row_done(self, row: int, ids: list[int]) -> bool:
        """Whether ``row``'s new ``ids`` hold a complete box (recorded in ``stopped_at``). Also SC-Tune's loop's host
        check (``sc_tune.decoding``), which asks for every prefix of a row in turn, as this criterion does."""
        complete = _holds_box(self.adapter, ids)
        if complete:
            self.stopped_at[row] = len(ids)
        return complete


def _holds_box(adapter: ModelAdapter, ids: Sequence[int]) -> bool:
    return adapter.locator_answer_end(adapter.decode(list(ids))) is not None


def _unnamed_token_ids(model, adapter: ModelAdapter) -> list[int]:
    """Rows of the output layer past the tokenizer's vocabulary (Qwen-VL: 151,860 tokens, 151,936 rows):
    a model can sample them but no tokenizer can decode them."""
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_layer is None:
        return []
    return list(range(len(adapter.tokenizer), output_layer.weight.shape[0]))


@torch.no_grad()
def generate(
    model,
    adapter: ModelAdapter,
    batch: PromptBatch,
    settings: GenerationSettings,
    skip_special_tokens: bool,
    prompt_cache=None,
    cached_columns: int | None = None,
    stop_at_box: bool = False,
    decoding: Decoding | None = None,
    sampled_rows: Sequence[SampledRows] | None = None,
    keep_prompt_rows: tuple[int, int] | None = None,
) -> Completions:
    """Batched ``generate`` on a left-padded batch; pads everything after each row's first end token.

    ``prompt_cache``: the key/value cache of this batch's first ``cached_columns`` columns, computed by ``model``
    (the same weights); decoding then starts from it instead of prefilling those columns again
    (:mod:`sc_tune.prompt_cache`). Default: all but the last column, of a pass over this batch's own layout, and the
    batch gets the family's positions (``ModelAdapter.resumed_positions``); with ``cached_columns`` the batch brings
    its own (a shared-prefix batch). ``stop_at_box``: a row also ends once its text holds a complete
    box (locator answers: :class:`BoxCompleteStop` in transformers' loop; in SC-Tune's, the loop's ``row_done`` check
    ends the row one step later and the row is cut at its box after the loop, the same tokens kept).

    ``decoding``: how the tokens are decoded (:mod:`sc_tune.decoding`: a static cache and CUDA graphs); ``None`` is
    transformers' own ``generate``. ``sampled_rows``: with sampling ``settings``, the row blocks that sample (and
    their generators); the other rows decode greedily in the same loop. Default: every row samples (or, with greedy
    settings, none). ``keep_prompt_rows=(start, end)``: return those rows' key/value cache of the prompt, all but its
    last column, as ``Completions.prompt_cache`` (a later pass over the same prompts starts from it)."""
    device = next(model.parameters()).device
    inputs = batch.to(device).inputs
    width = inputs["input_ids"].shape[1]
    if cached_columns is None:
        cached_columns = width - 1
        if prompt_cache is not None:
            # A cache of this batch's own layout: the family's positions for it, not a position state the model kept
            # from whichever batch it prefilled last (Qwen2 families' rope offset).
            inputs = {**inputs, **adapter.resumed_positions(model, inputs["input_ids"], inputs["attention_mask"],
                                                            batch.images)}
    if keep_prompt_rows is not None and prompt_cache is not None:
        raise ValueError("generate: keep_prompt_rows keeps the cache of a prefill; this call resumes from one")
    cached = prompt_cache is not None or keep_prompt_rows is not None
    cross = cached and getattr(model.config.get_text_config(decoder=True), "cross_attention_layers", None)
    if cross:
        # A prompt cache is cut and moved by text columns; these layers cache the image's vision states instead, which
        # the cut would crop or keep as if they were prompt columns.
        raise ValueError(f"generate: {type(model).__name__}'s cross-attention layers {list(cross)} cache the image's "
                         "vision states, not prompt columns: a prompt cache can neither be kept nor resumed from "
                         "(prefill the prompts)")
    if prompt_cache is not None and prompt_cache.get_seq_length() != cached_columns:
        raise ValueError(
            f"prompt_cache holds {prompt_cache.get_seq_length()} columns; this batch needs {cached_columns} "
            f"of its {width}"
        )
    if sampled_rows is not None and not settings.do_sample:
        raise ValueError("generate: sampled_rows need sampling settings (do_sample=True) for their warpers")
    # Captions are the completions decoded without special tokens (the describer's): they must not carry
    # box/reference tokens either; locator answers may (Qwen2-VL's <|box_end|>, GLM's <|end_of_box|>).
    kwargs = adapter.generation_kwargs(describer=skip_special_tokens)
    stop = BoxCompleteStop(adapter, width) if stop_at_box else None
    suppressed = (kwargs.pop("suppress_tokens") or []) + _unnamed_token_ids(model, adapter)
    if prompt_cache is not None:
        inputs = adapter.resumed_decoding_inputs(inputs)
    if decoding is not None or sampled_rows is not None:
        decoding = decoding if decoding is not None else Decoding(static_cache=False)
        if decoding.static_cache and not static_cache_fits(model.config, width + settings.max_new_tokens):
            decoding = dataclasses.replace(decoding, static_cache=False)  # a window shorter than the call
        if sampled_rows is None:
            sampled_rows = [SampledRows(0, inputs["input_ids"].shape[0])] if settings.do_sample else []
        # A locator row ends once its text holds a complete box, one step after it does (decoding._RowCheck): the
        # cut below keeps the same tokens as BoxCompleteStop does in transformers' loop.
        row_done = stop.row_done if stop is not None else None
        kwargs["custom_generate"] = make_decode_loop(decoding, sampled_rows, row_done=row_done)
        if decoding.static_cache and prompt_cache is not None:
            # The resumed decoding continues in a static cache that starts as a copy of the prompt cache.
            prompt_cache = static_cache_from(prompt_cache, model.config, width + settings.max_new_tokens - 1)
        elif decoding.static_cache and keep_prompt_rows is not None:
            # The call's own cache, to read the kept rows from (transformers' size: max_length - 1 columns).
            kwargs["cache"] = StaticCache(config=model.config, max_cache_len=width + settings.max_new_tokens - 1)
        elif decoding.static_cache:
            kwargs["cache_implementation"] = "static"
    if prompt_cache is not None:
        kwargs["cache"] = prompt_cache
    elif keep_prompt_rows is not None:
        kwargs.setdefault("cache", DynamicCache())
    if stop is not None and "custom_generate" not in kwargs:
        kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
    # The model's ZeRO-3 shards are gathered for the whole call (the trainer's and the snapshot's generating
    # contexts), so ranks need not decode in step. transformers would otherwise turn synced_gpus on under ZeRO-3,
    # keep a rank whose rows all ended stepping, and (5.24, Qwen2-VL) feed it a cache one column longer than its
    # inputs: a crash as soon as one rank's answers end before another's.
    kwargs["synced_gpus"] = False
    sequences = model.generate(**inputs, **settings.generate_kwargs(), **kwargs, suppress_tokens=suppressed or None)
    ids_BT = sequences[:, width:]
    mask_BT = completion_mask(ids_BT, adapter.end_token_ids)
    if stop is not None:
        for row, kept in stop.stopped_at.items():
            mask_BT[row, kept:] = 0
    if stop is not None and "custom_generate" in kwargs:
        # SC-Tune's loop ended a row found complete one token after its box (cut above). Its host check asked about
        # every prefix of every row but the whole row (an end token or the call's last step ended it), so no other
        # row holds a box before its end. The call keeps the width transformers' loop stops at: the longest row kept.
        longest = int(mask_BT.sum(dim=1).max()) if mask_BT.numel() else 0
        ids_BT, mask_BT = ids_BT[:, :longest], mask_BT[:, :longest]
    ids_BT = torch.where(mask_BT.bool(), ids_BT, torch.full_like(ids_BT, adapter.pad_token_id))
    decode = adapter.decode_caption if skip_special_tokens else adapter.decode
    texts = [decode(row[mask.bool()].tolist()) for row, mask in zip(ids_BT, mask_BT)]
    kept = None
    if keep_prompt_rows is not None:
        kept = prompt_rows_cache(kwargs["cache"], *keep_prompt_rows, columns=width - 1)
    return Completions(ids_BT, mask_BT, texts, kept)


def describe(
    model,
    adapter: ModelAdapter,
    images: Sequence[ImageInputs],
    boxes_norm: Sequence[Sequence[float]],
    settings: GenerationSettings,
    decoding: Decoding | None = None,
    sampled_rows: Sequence[SampledRows] | None = None,
    keep_prompts: bool = False,
) -> tuple[PromptBatch, Completions]:
    """Caption each box; ``Completions.texts`` are the captions, special tokens removed. ``sampled_rows``: see
    :func:`generate` (a sampling call's noise blocks). ``keep_prompts``: the completions keep the prompts' cache
    (``Completions.prompt_cache``, all but the last column) where the family moves cached columns, for locating the
    captions from their image prefix (``ScoredPrompts`` of ``batch`` and that cache, :func:`locate_from_prefix`)."""
    prompts = [adapter.describer_prompt(box, image) for box, image in zip(boxes_norm, images)]
    batch = adapter.build_batch(prompts, images)
    width = batch.inputs["input_ids"].shape[1]
    keep = keep_prompts and adapter.moves_cached_prompt_columns(model, width + settings.max_new_tokens)
    return batch, generate(model, adapter, batch, settings, skip_special_tokens=True, decoding=decoding,
                           sampled_rows=sampled_rows, keep_prompt_rows=(0, len(prompts)) if keep else None)


def describe_with_greedy(
    model,
    adapter: ModelAdapter,
    sampled_images: Sequence[ImageInputs],
    sampled_boxes: Sequence[Sequence[float]],
    greedy_images: Sequence[ImageInputs],
    greedy_boxes: Sequence[Sequence[float]],
    sampling: GenerationSettings,
    greedy: GenerationSettings,
    decoding: Decoding | None = None,
    sample_blocks: Sequence[SampledRows] | None = None,
    keep_greedy_prompts: bool = False,
) -> tuple[PromptBatch, Completions, Completions]:
    """Sampled captions of ``sampled_boxes`` and greedy captions of ``greedy_boxes`` in one decoding loop: rows
    ``0..N`` sample, rows ``N..N+G`` decode greedily (the caller picks each block's LoRA adapter with
    ``sc_tune.snapshot.row_adapters``). Returns the sampled rows' own prompt batch (for scoring), their
    completions and the greedy completions, each equal to what a separate call would return.

    ``sample_blocks``: the sampled rows' noise blocks within ``0..N`` (default: one, the global generator).
    ``keep_greedy_prompts``: the greedy completions keep their rows' prompt cache (``Completions.prompt_cache``) where
    the family lets a pass over the same prompts resume from it (``resumes_from_scoring_cache``, asked at the longest
    sequence such a pass can read: a prompt and a caption). The greedy rows' prompts must then be the sampled rows'
    (one sample per box): a pass over the sampled batch can start from them."""
    if (sampling.max_new_tokens, sampling.min_new_tokens) != (greedy.max_new_tokens, greedy.min_new_tokens):
        raise ValueError("describe_with_greedy: one loop needs the same caption length limits for both kinds of rows")
    n = len(sampled_images)
    prompts = [adapter.describer_prompt(box, image) for box, image in zip(sampled_boxes, sampled_images)]
    greedy_prompts = [adapter.describer_prompt(box, image) for box, image in zip(greedy_boxes, greedy_images)]
    both = adapter.build_batch(prompts + greedy_prompts, list(sampled_images) + list(greedy_images))
    blocks = sample_blocks if sample_blocks is not None else [SampledRows(0, n)]
    if any(block.start < 0 or block.end > n for block in blocks):
        raise ValueError(f"describe_with_greedy: sample blocks {blocks} reach outside the {n} sampled rows")
    width = both.inputs["input_ids"].shape[1]
    keep = None
    if keep_greedy_prompts:
        if greedy_prompts != prompts:
            raise ValueError("describe_with_greedy: keep_greedy_prompts needs the greedy rows' prompts to be the "
                             "sampled rows' (one sample per box, in the same order)")
        if adapter.resumes_from_scoring_cache(model, width, width + sampling.max_new_tokens):
            keep = (n, n + len(greedy_images))
    completions = generate(model, adapter, both, sampling, skip_special_tokens=True, decoding=decoding,
                           sampled_rows=blocks, keep_prompt_rows=keep)
    batch = adapter.build_batch(prompts, list(sampled_images))
    greedy = completions.rows(n, n + len(greedy_images))
    greedy.prompt_cache = completions.prompt_cache
    return batch, completions.rows(0, n), greedy


def locate(
    model,
    adapter: ModelAdapter,
    images: Sequence[ImageInputs],
    captions: Sequence[str],
    settings: GenerationSettings,
    fit_budget: bool = True,
    decoding: Decoding | None = None,
) -> tuple[list[list[float] | None], list[str]]:
    """Ground each caption; returns normalised boxes (``None`` on a parse failure) and the raw texts.

    ``fit_budget`` raises ``settings.max_new_tokens`` to the family's longest box (see ``fit_locator_budget``).
    Each row's answer ends with the token that completes its box (see ``generate``'s ``stop_at_box``)."""
    if fit_budget:
        settings = fit_locator_budget(adapter, images, settings, captions)
    batch = adapter.build_batch([adapter.locator_prompt(c, im) for c, im in zip(captions, images)], images)
    completions = generate(model, adapter, batch, settings, skip_special_tokens=False, stop_at_box=True,
                           decoding=decoding)
    boxes = [adapter.parse_locator_output(text, im) for text, im in zip(completions.texts, images)]
    return boxes, completions.texts


def locate_from_prefix(
    model,
    adapter: ModelAdapter,
    images: Sequence[ImageInputs],
    captions: Sequence[str],
    settings: GenerationSettings,
    scored: ScoredPrompts,
    source_rows: Sequence[int],
    decoding: Decoding | None = None,
) -> tuple[list[list[float] | None], list[str]] | None:
    """:func:`locate`, resuming from the image prefix that ``model`` cached while reading ``scored`` (caption ``j``
    is about the image of its row ``source_rows[j]``); ``None`` where the family cannot share it
    (:func:`sc_tune.prompt_cache.shared_prefix_batch`): call :func:`locate` then."""
    prompts = [adapter.locator_prompt(c, im) for c, im in zip(captions, images)]
    shared = shared_prefix_batch(model, adapter, scored, source_rows, prompts, images)
    if shared is None:
        return None
    settings = fit_locator_budget(adapter, images, settings, captions)
    completions = generate(model, adapter, shared.batch, settings, skip_special_tokens=False,
                           prompt_cache=shared.cache, cached_columns=shared.columns, stop_at_box=True,
                           decoding=decoding)
    boxes = [adapter.parse_locator_output(text, im) for text, im in zip(completions.texts, images)]
    return boxes, completions.texts


def cycle(
    describer,
    locator,
    adapter: ModelAdapter,
    images: Sequence[ImageInputs],
    boxes_norm: Sequence[Sequence[float]],
    describe_settings: GenerationSettings,
    locate_settings: GenerationSettings,
    fit_budget: bool = True,
) -> Cycle:
    """One describer -> locator cycle; ``describer`` and ``locator`` may be the same model."""
    batch, captions = describe(describer, adapter, images, boxes_norm, describe_settings)
    boxes, texts = locate(locator, adapter, images, captions.texts, locate_settings, fit_budget)
    return Cycle(batch, captions, boxes, texts)
