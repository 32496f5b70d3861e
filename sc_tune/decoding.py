"""The token loop behind ``rollout.generate`` when decoding is fast (``--static_decoding``) or planned per row.

transformers' ``generate`` still prepares every call: generation config, special tokens, position ids, the cache,
the logits processors and the stopping criteria. Its ``custom_generate`` hook then hands the token loop to
:func:`decode_loop`, which does what transformers' ``_sample`` does, token for token, with three changes.

1. **Fixed-shape steps, captured once.** With a static key/value cache (transformers' ``StaticCache``) every decode
   step has the same shapes. Its inputs live in preallocated buffers (the last token, the positions, the cache
   column), and its attention mask is computed inside the step from the column. On CUDA the whole step (forward,
   logits rules, token choice, bookkeeping) is therefore captured once as a CUDA graph and replayed: launching the
   ~2,000 kernels of a 7 B decode step one by one took ~43 ms on an H100 (docs/performance.md), ten times the time
   the card needs to read the weights; a replay costs the host one launch. A fresh graph is captured per call (the
   cache is the call's own), after the first decode step has run eagerly as the warm-up; capturing is about one
   forward's time. The host still reads one flag per step (all rows finished?), so a call stops where
   transformers' would, and may end rows itself (``row_done``, the locator's complete box): it reads each step's
   new tokens while the device runs the next step, and a row it finds done is marked finished one step late,
   after which the row writes padding as after an end token (:class:`_RowCheck`).
2. **Per-row plans.** Rows outside every sampled block decode greedily, so one loop can hold the policy's sampled
   captions and greedy captions (the snapshot's, with another LoRA adapter per row block:
   ``sc_tune.snapshot.row_adapters``). A greedy row takes the argmax of the scores after the logits *rules*
   (suppressed tokens, minimum length, repetition penalty), which is what a separate greedy call takes; the sampling
   *warpers* (temperature, top-k, top-p) never touch it.
3. **Sampling noise per row block.** ``torch.multinomial(p, 1)`` is ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn in
   one call from one generator. The loop draws ``q`` itself, per block of sampled rows, from the block's generator
   (default: one block of every row and the global generator, so the tokens equal transformers' ``generate``). A
   block's samples then do not depend on which other rows share the call (a rollout of a whole accumulation window
   samples what per-micro-batch rollouts would, ``--generation_batch_size``).

Exactness (``tests/test_decoding.py``): greedy and sampled tokens equal transformers' ``generate`` with a dynamic
cache, the per-step logits within float rounding, for every family that opts in
(``ModelAdapter.static_decoding_problem``), from a fresh prefill and from a handed-in prompt cache.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import StaticCache
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from sc_tune.attention import WINDOW_LAYER_KINDS, attention_routed, text_layer_caches

logger = logging.getLogger(__name__)

# Applied to sampled rows only, after every rule (transformers appends them last, and only when sampling).
_WARPERS = (
    lp.TemperatureLogitsWarper,
    lp.TopKLogitsWarper,
    lp.TopPLogitsWarper,
    lp.TopHLogitsWarper,
    lp.MinPLogitsWarper,
    lp.TypicalLogitsWarper,
    lp.EpsilonLogitsWarper,
    lp.EtaLogitsWarper,
)
# Rules that read no more of ``input_ids`` than the set of tokens it holds (or nothing): they see the loop's
# fixed-width sequence buffer, whose not-yet-written columns repeat a token the row already holds.
_SET_RULES = (lp.RepetitionPenaltyLogitsProcessor, lp.InfNanRemoveLogitsProcessor)


@dataclass(frozen=True)
class Decoding:
    """How ``rollout.generate`` decodes. ``None`` instead of one of these is transformers' own ``generate``."""

    static_cache: bool = True  # transformers' StaticCache and fixed-shape steps (else a DynamicCache, eager steps)
    cuda_graphs: bool = True  # on CUDA, with the static cache: capture the step once per call, replay it
    compile_backend: str | None = None  # torch.compile the step first ("inductor", "aot_eager", ...); None: eager


@dataclass(frozen=True)
class SampledRows:
    """Rows ``start:end`` of a call sample (with the call's warpers), their noise from ``generator`` (None: the
    global generator). Rows outside every block decode greedily."""

    start: int
    end: int
    generator: torch.Generator | None = None


@dataclass
class DecodeStats:
    """What the loop did, summed over calls (read by ``scripts/gpu_check.py``)."""

    calls: int = 0
    rows: int = 0  # rows decoded, over calls
    decode_steps: int = 0  # forwards after the prefill
    decode_seconds: float = 0.0  # wall time of those steps (synchronised), graph capture excluded
    first_step_seconds: float = 0.0  # of which each call's first step (eager: the warm-up before a capture)
    prefill_seconds: float = 0.0
    capture_seconds: float = 0.0
    loop_seconds: float = 0.0  # wall time inside the loop: prefill, steps, capture and the loop's own set-up
    graph_calls: int = 0  # calls whose steps replayed a CUDA graph
    graph_failures: int = 0  # captures that failed (those calls decoded eagerly); the first error below
    graph_error: str | None = None
    graph_model_part_only: int = 0  # calls whose graph held the model's part only (token choice eager)
    rows_stopped_at_box: int = 0  # rows the host check ended (row_done: rollout.generate's locator box check)
    by_rows: dict[int, int] = field(default_factory=dict)  # rows per call -> decode steps at that size

    def pop(self) -> DecodeStats:
        copy = DecodeStats(**{**self.__dict__, "by_rows": dict(self.by_rows)})
        self.__init__()
        return copy


STATS = DecodeStats()

# Called with each decode step's index just before the step runs (after any capture), and with None once the call's
# last step has finished (synchronised). Empty in training; ``scripts/gpu_check.py --profile`` opens and closes its
# profiler window here, around replays only.
STEP_HOOKS: list[Callable[[int | None], None]] = []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _EosBlockedUntil:
    """transformers' MinNewTokensLength / MinLength rule with the step as a tensor (a captured step cannot read a
    Python length): end tokens are -inf while fewer than ``until`` tokens are written."""

    def __init__(self, eos_ids: torch.Tensor, until: int, vocab: int, device):
        self.eos_mask = torch.isin(torch.arange(vocab, device=device), eos_ids.to(device))
        self.until = until

    def __call__(self, seq, scores, written):
        return torch.where(self.eos_mask & (written < self.until), -float("inf"), scores)


class _Suppressed:
    """transformers' SuppressTokensLogitsProcessor with its mask built once on the device: the processor moves its
    token list to the device in every call, a host-to-device copy that stream capture refuses (found on an H200 with
    Qwen2.5-VL-7B, whose output layer has 399 rows past the tokenizer, all suppressed)."""

    def __init__(self, suppress_tokens: torch.Tensor, vocab: int, device):
        self.mask = torch.isin(torch.arange(vocab, device=device), suppress_tokens.to(device))

    def __call__(self, seq, scores, written):
        return torch.where(self.mask, -float("inf"), scores)


def _rules_and_warpers(processors, prompt_length: int, eos_ids, vocab: int, device):
    """transformers' processor list -> (rules: (seq, scores, written) -> scores, warpers: (seq, scores) -> scores)."""
    rules, warpers = [], []
    for processor in processors:
        if isinstance(processor, _WARPERS):
            warpers.append(processor)
        elif warpers:
            raise ValueError(f"decoding: logits processor {type(processor).__name__} after the sampling warpers")
        elif isinstance(processor, lp.MinNewTokensLengthLogitsProcessor):
            rules.append(_EosBlockedUntil(eos_ids, processor.min_new_tokens, vocab, device))
        elif isinstance(processor, lp.MinLengthLogitsProcessor):
            rules.append(_EosBlockedUntil(eos_ids, processor.min_length - prompt_length, vocab, device))
        elif isinstance(processor, lp.SuppressTokensLogitsProcessor):
            rules.append(_Suppressed(processor.suppress_tokens, vocab, device))
        elif isinstance(processor, _SET_RULES):
            rules.append(lambda seq, scores, written, rule=processor: rule(seq, scores))
        else:
            raise ValueError(
                f"decoding: cannot apply the logits processor {type(processor).__name__} (it reads the sequence "
                "beyond its set of tokens); decode with transformers' generate (--static_decoding false)"
            )
    return rules, warpers


class _Loop:
    """The loop's state: fixed-size buffers that every step updates in place (so a captured step can replay)."""

    def __init__(self, input_ids, max_new, rules, warpers, blocks, eos_ids, pad_id, vocab, keep_logits):
        n, p = input_ids.shape
        device = input_ids.device
        self.n, self.prompt, self.max_new, self.vocab = n, p, max_new, vocab
        self.rules, self.warpers, self.blocks = rules, warpers, blocks
        self.eos_ids, self.pad = eos_ids.to(device), pad_id
        self.written = torch.zeros((), dtype=torch.long, device=device)  # tokens written so far
        self.unfinished = torch.ones(n, dtype=torch.long, device=device)
        self.last = torch.zeros(n, dtype=torch.long, device=device)  # the token the next forward reads
        self.out = torch.full((n, max_new), int(pad_id), dtype=torch.long, device=device)
        # The sequence the rules see: the prompt, then the written tokens; columns not written yet repeat the row's
        # last prompt token, a token the row already holds (what a rule reads is the set of tokens).
        self.seq = torch.cat([input_ids, input_ids[:, -1:].expand(n, max_new)], dim=1).contiguous()
        self.logits = torch.zeros((n, vocab), dtype=torch.float32, device=device) if keep_logits else None
        # rows first..last-1 hold every sampled block (and any greedy rows between them)
        self.sampled_span = (min(b.start for b in blocks), max(b.end for b in blocks)) if blocks else (0, 0)

    def advance(self, logits_NV: torch.Tensor) -> None:
        """Choose each row's next token from ``logits_NV`` and record it (no host read: capturable)."""
        scores = logits_NV.to(dtype=torch.float32)
        if self.logits is not None:
            self.logits.copy_(scores)
        for rule in self.rules:
            scores = rule(self.seq, scores, self.written)
        token = scores.argmax(dim=-1)  # greedy rows keep this
        if self.blocks:
            # The warpers work row by row, so they run on the sampled rows' span only: in the fused describer loop
            # that halves the top-p sort over the vocabulary (the greedy half never reads it).
            first, last = self.sampled_span
            warped = scores[first:last]
            for warper in self.warpers:
                warped = warper(self.seq[first:last], warped)
            probs = torch.nn.functional.softmax(warped, dim=-1)
            for block in self.blocks:
                # torch.multinomial(p, 1) == argmax(p / q), q ~ Exp(1) of p's shape, from the same generator
                noise = torch.empty((block.end - block.start, self.vocab), dtype=probs.dtype, device=probs.device)
                noise.exponential_(1, generator=block.generator)
                rows = probs[block.start - first : block.end - first]
                token[block.start : block.end] = (rows / noise).argmax(dim=-1)
        token = token * self.unfinished + self.pad * (1 - self.unfinished)
        column = self.written.view(1)
        self.out.index_copy_(1, column, token[:, None])
        self.seq.index_copy_(1, column + self.prompt, token[:, None])
        self.unfinished.mul_((~torch.isin(token, self.eos_ids)).long())
        self.last.copy_(token)
        self.written.add_(1)


class _RowCheck:
    """The host's own per-row check ``row_done(row, row_ids) -> bool`` (the locator's: does the row's text hold a
    complete box?), one step late so that it overlaps the device's next step instead of waiting for it.

    Each step: :meth:`check` reads the column :meth:`fetch` copied after the previous step (already on the host once
    that step ended, while the step just launched runs), appends it to each open row's ids and asks ``row_done`` of
    those rows; then :meth:`fetch` copies the new column (``non_blocking`` into pinned memory on CUDA, behind the step
    that writes it). A row found done is marked finished in the loop's ``unfinished`` flags in place (the tensor a
    captured step reads), so from the step after the one in flight on it writes padding, as after an end token:
    one token past the complete box, which ``rollout.generate`` cuts as before, so the kept tokens are the same.

    Cost per step: one ``row_done`` per open row (rows that wrote an end token or were found done are dropped: their
    text cannot change), the locator's a decode of the row's ids so far (tens of tokens) and a parse of its text."""

    def __init__(self, row_done: Callable[[int, list[int]], bool], loop: _Loop):
        self.row_done, self.loop = row_done, loop
        self.end_ids = set(loop.eos_ids.tolist())
        device = loop.last.device
        # Rows unfinished on the device after the columns read so far (an end token or a found box ends one there).
        self.open_ids: dict[int, list[int]] = {row: [] for row in range(loop.n)}
        self.column = torch.empty(loop.n, dtype=torch.long, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.fetched = False
        self.stopped = 0

    def fetch(self) -> None:
        """Start copying the newest column (``loop.last``) to the host, behind the step that writes it."""
        self.column.copy_(self.loop.last, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.fetched = True

    def check(self) -> None:
        """Read the fetched column into the open rows; mark the rows ``row_done`` finds done as finished."""
        if not self.fetched:
            return
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.column.tolist()  # read before the next fetch overwrites the buffer
        self.fetched = False
        done = []
        for row in list(self.open_ids):
            ids = self.open_ids[row]
            ids.append(tokens[row])
            if tokens[row] in self.end_ids:
                del self.open_ids[row]  # ended on the device by its end token
            elif self.row_done(row, ids):
                del self.open_ids[row]
                done.append(row)
        if done:
            # From pinned memory without blocking (a pageable copy would wait for the step in flight), into the very
            # flags tensor the steps read: a captured graph replays with the tensor it was recorded with.
            rows = torch.tensor(done, dtype=torch.long, pin_memory=self.copied is not None)
            unfinished = self.loop.unfinished
            unfinished.index_fill_(0, rows.to(unfinished.device, non_blocking=True), 0)
            self.stopped += len(done)


def _decode_mask(template_mask, key_mask_NL, column):
    """The attention mask of one decode step, in the form the model's template took: a boolean (N, 1, 1, L) mask
    (padding keys and columns past the query's hidden), or a per-layer-type mapping of them (hybrid models)."""
    positions = torch.arange(key_mask_NL.shape[1], device=key_mask_NL.device)
    full = (key_mask_NL & (positions <= column)[None, :])[:, None, None, :]
    if isinstance(template_mask, dict):
        masks = {}
        for kind, value in template_mask.items():
            # A window layer is a full one here: static decoding runs only where every window covers the whole call
            # (static_cache_fits), so the window hides nothing.
            if kind in ("full_attention", "sliding_attention", "chunked_attention"):
                masks[kind] = full
            elif value is None:  # linear-attention layers take no mask on a one-token step
                masks[kind] = None
            else:
                raise ValueError(f"static decoding: no decode-step mask for {kind!r} layers")
        return masks
    return full


# The attention of a static decode step, registered with transformers' attention interface under this name while the
# step runs. On a grouped-query model one query token per row attends to each key/value head with the query heads
# that share it, as that head's query rows: the step reads every cached key and value once. transformers' SDPA does
# the same, but not under torch.compile (``--decoding_compile_backend``), where it first copies every key/value head
# once per query head it serves (``repeat_kv``). On Qwen2.5-VL-7B (7 query heads per key/value head), 128 rows and a
# 350-column cache in bf16, the copies make about 38 GB of memory traffic per step over 28 layers (written, then read
# by the attention): fifteen times the 2.6 GB of keys and values read once, and more than twice the 14.8 GB of
# weights (scripts/bench_decode_attention.py).
DECODE_ATTENTION = "sc_tune_sdpa_decode"


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention for a (B, H, 1, D) query against (B, H_kv, L, D) keys and values, with the
    ``H / H_kv`` query heads of each key/value head as its query rows; any other call goes to transformers' SDPA.
    Returns (B, 1, H, D), as transformers' does."""
    groups = getattr(module, "num_key_value_groups", 1)
    packable = (query.shape[2] == 1 and groups > 1 and not dropout and kwargs.get("position_bias") is None
                and kwargs.get("softcap") is None and (attention_mask is None or attention_mask.shape[1] == 1))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    rows = query.reshape(batch, heads // groups, groups, dim)  # a mask (B, 1, 1, L) broadcasts over them
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _decode_attention_for(text_config):
    """``text_config``'s attention set to :func:`_decode_attention` for the block (masks are made as SDPA's). Static
    decoding runs on SDPA models only (``ModelAdapter.static_decoding_problem``); any other is left alone."""
    return attention_routed(text_config, DECODE_ATTENTION, _decode_attention, lambda current: current == "sdpa",
                            mask_function=sdpa_mask)


class _StaticStep:
    """One decode step on fixed buffers: the model's own step inputs (transformers' ``prepare_inputs_for_generation``
    for the first step), with the token, positions and mask replaced by buffers the step advances itself."""

    def __init__(self, model, loop: _Loop, input_ids, model_kwargs, cache, compile_backend):
        self.model, self.loop = model, loop
        first = torch.cat([input_ids, loop.out[:, :1]], dim=1)
        template = model.prepare_inputs_for_generation(first, next_sequence_length=1, **model_kwargs)
        # The text's columns, which the step's mask spans: a cross-attention layer (Llama 3.2 Vision's) caches the
        # vision states instead, as many columns as the image's tiles (MllamaForConditionalGeneration's
        # _prepare_static_cache), far more than a rollout's text in the releases.
        self.text_config = model.config.get_text_config(decoder=True)
        cross = set(getattr(self.text_config, "cross_attention_layers", None) or ())
        length = max(layer.max_cache_len for index, layer in enumerate(cache.layers)
                     if index not in cross and hasattr(layer, "max_cache_len"))
        prompt_mask = model_kwargs.get("attention_mask")
        key_mask = torch.ones((loop.n, length), dtype=torch.bool, device=input_ids.device)
        if prompt_mask is not None and prompt_mask.dim() == 2:
            key_mask[:, : input_ids.shape[1]] = prompt_mask[:, : input_ids.shape[1]].bool()
        self.key_mask = key_mask
        self.column = torch.full((), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        self.template_mask = template.get("attention_mask")
        position_ids = template.get("position_ids")
        self.positions = position_ids.clone() if position_ids is not None else None
        self.inputs = {k: v for k, v in template.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        self.forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)

    def model_part(self) -> torch.Tensor:
        """The forward of the step and the advance of its column and positions: the next logits (no token chosen)."""
        loop = self.loop
        inputs = dict(self.inputs)
        inputs["input_ids"] = loop.last[:, None]
        inputs["attention_mask"] = _decode_mask(self.template_mask, self.key_mask, self.column)
        if self.positions is not None:
            inputs["position_ids"] = self.positions
        with _decode_attention_for(self.text_config):
            logits = self.forward(**inputs, return_dict=True).logits[:, -1]
        self.column.add_(1)
        if self.positions is not None:
            self.positions.add_(1)
        return logits

    def __call__(self) -> None:
        self.loop.advance(self.model_part())


class _DynamicStep:
    """One decode step as transformers' ``_sample`` takes it (growing inputs, any cache)."""

    def __init__(self, model, loop: _Loop, input_ids, model_kwargs):
        self.model, self.loop, self.kwargs = model, loop, model_kwargs
        self.ids = torch.cat([input_ids, loop.out[:, :1]], dim=1)

    def __call__(self) -> None:
        inputs = self.model.prepare_inputs_for_generation(self.ids, next_sequence_length=1, **self.kwargs)
        outputs = self.model(**inputs, return_dict=True)
        self.kwargs = self.model._update_model_kwargs_for_generation(outputs, self.kwargs, is_encoder_decoder=False)
        self.loop.advance(outputs.logits[:, -1])
        self.ids = torch.cat([self.ids, self.loop.last[:, None]], dim=1)


def _check_stopping(stopping_criteria) -> None:
    for criterion in stopping_criteria:
        if not isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)):
            raise ValueError(f"decoding: stopping criterion {type(criterion).__name__} is not supported")


def make_decode_loop(decoding: Decoding, blocks: Sequence[SampledRows], keep_logits: bool = False, logits=None,
                     row_done: Callable[[int, list[int]], bool] | None = None):
    """The ``custom_generate`` callable for one ``generate`` call. ``logits``: a list that receives each step's raw
    logits (tests). ``row_done(row, row_ids)``: whether a row, given its new ids so far, is done (it then ends one step
    later, :class:`_RowCheck`); ``None``: rows end at their end token or the budget only."""

    def decode_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        _check_stopping(stopping_criteria)
        device = input_ids.device
        eos_ids = generation_config._eos_token_tensor
        pad_id = generation_config._pad_token_tensor
        vocab = model.get_output_embeddings().weight.shape[0]
        n, prompt = input_ids.shape
        max_new = generation_config.max_length - prompt
        rules, warpers = _rules_and_warpers(logits_processor, prompt, eos_ids, vocab, device)
        if blocks and not warpers and generation_config.do_sample is False:
            raise ValueError("decoding: sampled rows need a sampling call (do_sample=True)")
        loop = _Loop(input_ids, max_new, rules, warpers, list(blocks), eos_ids, pad_id, vocab, keep_logits)
        static = isinstance(model_kwargs.get("cache"), StaticCache)
        _sync(device)
        start = entered = time.perf_counter()
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        loop.advance(outputs.logits[:, -1])
        del outputs
        if logits is not None:
            logits.append(loop.logits.clone())
        _sync(device)
        STATS.prefill_seconds += time.perf_counter() - start
        STATS.calls += 1
        STATS.rows += n

        steps = 0
        row_check = _RowCheck(row_done, loop) if row_done is not None else None
        if max_new > 1 and bool(loop.unfinished.any()):
            cache = model_kwargs["cache"]
            if static:
                step = _StaticStep(model, loop, input_ids, model_kwargs, cache, decoding.compile_backend)
            else:
                step = _DynamicStep(model, loop, input_ids, model_kwargs)
            graphed = static and decoding.cuda_graphs and device.type == "cuda" and _graph_takes(blocks)
            # As transformers' _sample: MoE experts switch to their decode-friendly kernels on accelerators.
            optimize = getattr(model, "_optimize_model_for_decode", nullcontext)
            with optimize():
                steps = _run(step, loop, graphed, device, logits, row_check)
        STATS.decode_steps += steps
        STATS.rows_stopped_at_box += row_check.stopped if row_check is not None else 0
        STATS.by_rows[n] = STATS.by_rows.get(n, 0) + steps
        written = int(loop.written)
        sequences = torch.cat([input_ids, loop.out[:, :written]], dim=1)
        _sync(device)
        STATS.loop_seconds += time.perf_counter() - entered
        return sequences

    return decode_loop


def _run(step, loop: _Loop, graphed: bool, device, logits, row_check: _RowCheck | None = None) -> int:
    """Run decode steps until every row has ended (end token, budget, or ``row_check``) or the budget is spent;
    returns the number of steps."""
    steps = 0
    replay = step
    capture = 0.0
    _sync(device)
    start = time.perf_counter()
    if row_check is not None:
        row_check.fetch()  # the prefill's token, checked while the first step runs
    while int(loop.written) < loop.max_new and bool(loop.unfinished.any()):
        if graphed and steps == 1:
            # The first step ran eagerly (warm-up: cuBLAS workspaces, lazy buffers); capture the next one. A capture
            # that fails costs speed, not the run: this call's steps go on eagerly (recording ran no kernel).
            _sync(device)
            began = time.perf_counter()
            replay = _capture_or_fall_back(step, loop)
            graphed = replay is not step
            _sync(device)
            capture += time.perf_counter() - began
        for hook in STEP_HOOKS:
            hook(steps)
        if steps == 0:
            first = time.perf_counter()
        if graphed and steps == 0:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            replay()
        if steps == 0:
            _sync(device)
            STATS.first_step_seconds += time.perf_counter() - first
        steps += 1
        if row_check is not None:
            # While the device runs the step just launched: check the previous step's column (rows found done end
            # from the next step on), then fetch this step's column behind it.
            row_check.check()
            row_check.fetch()
        if logits is not None:
            logits.append(loop.logits.clone())
    _sync(device)
    for hook in STEP_HOOKS:
        hook(None)
    STATS.decode_seconds += time.perf_counter() - start - capture
    STATS.capture_seconds += capture
    if graphed and steps > 1:
        STATS.graph_calls += 1
    return steps


def _graph_takes(blocks: Sequence[SampledRows]) -> bool:
    """A captured step may draw from a generator of its own only where the graph can register it (the global one is
    registered by itself); without that the steps run eagerly (slower, same tokens)."""
    own = any(block.generator is not None for block in blocks)
    return not own or hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def _capture_or_fall_back(step, loop: _Loop):
    """The replay of ``step``: the whole step as one CUDA graph; where that capture fails, the model's part as a graph
    and the token choice eagerly after each replay; where that fails too, ``step`` itself (eager). A failed capture
    costs speed, never the run or its tokens: the generators it registered are given back their state.

    Why the second form: the token choice holds the sampling warpers, and a top-p sort over a real vocabulary (152k
    columns) runs a library sort that stream capture can refuse, while the toy vocabularies sort in one kernel."""
    for whole in (True, False):
        generators = _generators(loop)
        saved = [generator.clone_state() for generator in generators]
        try:
            if whole:
                return _capture(step, loop.blocks)
            replay_model_part, logits = _capture(step.model_part, loop.blocks, keep_output=True)

            def replay():
                replay_model_part()
                loop.advance(logits)

            STATS.graph_model_part_only += 1
            return replay
        except RuntimeError as error:
            for generator, state in zip(generators, saved):
                # A capture that ends in an error never closes its generators' capture (their offsets would refuse
                # every later draw: "Offset increment outside graph capture").
                generator.graphsafe_set_state(state)
            STATS.graph_failures += 1
            STATS.graph_error = STATS.graph_error or (
                f"{'step' if whole else 'model part'}: {type(error).__name__}: {error}\n{traceback.format_exc()}"
            )[:4000]
            logger.warning("decoding: CUDA graph capture of the %s failed: %s", "step" if whole else "model part",
                           error)
    logger.warning("decoding: decoding this call eagerly")
    return step


def _generators(loop: _Loop) -> list:
    """The generators a capture registers: the device's default one (always) and the row blocks' own."""
    device = loop.out.device
    own = [block.generator for block in loop.blocks if block.generator is not None]
    return [torch.cuda.default_generators[device.index or 0], *own] if device.type == "cuda" else own


def _capture(function, blocks: Sequence[SampledRows], keep_output: bool = False):
    """``function`` recorded as a CUDA graph (recording runs no kernel); returns the replay (and, with
    ``keep_output``, the tensor each replay rewrites)."""
    graph = torch.cuda.CUDAGraph()
    for block in blocks:
        if block.generator is not None:
            graph.register_generator_state(block.generator)
    stream = torch.cuda.current_stream()
    try:
        # thread_local: another thread's CUDA call (a data loader pinning memory) must not void this capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = function()
    except RuntimeError:
        # torch's graph context stops at the failed capture_end: it leaves its capture stream current and new
        # allocations routed to the graph's pool. Undo both, so that the eager steps that follow run as before.
        torch.cuda.set_stream(stream)
        try:
            torch._C._cuda_endAllocateToPool(stream.device.index, graph.pool())
        except RuntimeError:
            pass  # the capture ended before the pool was taken
        raise
    return (graph.replay, output) if keep_output else graph.replay


def static_cache_fits(config, length: int) -> bool:
    """Whether a static cache of ``length`` columns decodes ``config``'s model with every layer a full one here: window
    layers (Gemma's sliding attention, Mistral's) only when their window covers the whole call (a full static window
    cache rolls, which a captured step cannot follow)."""
    return all(window is not None and window >= length
               for kind, window in text_layer_caches(config) if kind in WINDOW_LAYER_KINDS)


def static_cache_from(cache, config, max_cache_len: int):
    """A ``StaticCache`` of ``max_cache_len`` columns holding ``cache``'s keys and values (a prompt cache built by
    another pass), for a static-cache decoding that resumes from it. Only attention layers can be moved."""
    static = StaticCache(config=config, max_cache_len=max_cache_len)
    if len(static.layers) != len(cache.layers):
        raise ValueError(f"prompt cache has {len(cache.layers)} layers, the model {len(static.layers)}")
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or not hasattr(static.layers[index], "max_cache_len"):
            raise ValueError("static decoding can resume only from a key/value cache of attention layers")
        static.layers[index].update(layer.keys, layer.values)
    return static


DECODING_MODES = ("auto", "true", "false")


def choose_decoding(mode: str, adapter, model, device, sharded: bool = False,
                    compile_backend: str | None = None) -> Decoding | None:
    """The decoding of ``--static_decoding``: ``false`` keeps transformers' ``generate``; ``true`` needs the family's
    static decoding (an error naming the family where it has none); ``auto`` takes it on CUDA where the family has it.
    CUDA graphs go with it on CUDA, except for a sharded model (ZeRO-3 gathers parameters inside every forward).
    ``compile_backend`` (``--decoding_compile_backend``): the step's forward through ``torch.compile``; refused where
    static decoding does not run or the model is sharded."""
    mode = str(mode).lower()
    if mode not in DECODING_MODES:
        raise ValueError(f"--static_decoding must be one of {', '.join(DECODING_MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "false" or (mode == "auto" and device.type != "cuda"):
        if compile_backend is not None:
            raise ValueError(f"--decoding_compile_backend compiles the static decoding step, which does not run here "
                             f"(--static_decoding {mode} on {device.type}); use --static_decoding true")
        return None
    problem = adapter.static_decoding_problem(model)
    if problem is not None:
        if mode == "true" or compile_backend is not None:
            flag = "--static_decoding true" if mode == "true" else "--decoding_compile_backend"
            raise ValueError(f"{flag}: {problem}; use --static_decoding auto or false")
        return None
    if compile_backend is not None and sharded:
        raise ValueError("--decoding_compile_backend: the model is sharded (ZeRO-3 gathers its parameters inside every "
                         "forward, which a compiled step cannot hold); use ZeRO-2 or leave the step eager")
    return Decoding(static_cache=True, cuda_graphs=device.type == "cuda" and not sharded,
                    compile_backend=compile_backend)

