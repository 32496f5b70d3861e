"""Caption metrics in plain Python: BLEU-1..4 and CIDEr-D as defined by the COCO caption evaluation,
plus METEOR through the official Java jar only when ``java`` (and the jar) are available.

Why our own code: the COCO toolkit tokenises with the Java PTB tokenizer, so even its pure-Python BLEU and
CIDEr need Java in practice. Here tokenisation is a small Python approximation of it (lower case,
punctuation dropped, clitics such as ``'s`` and ``n't`` split off, hyphenated words kept whole), and the
scorers follow the published definitions:

- BLEU-n (Papineni et al. 2002), corpus level: clipped n-gram precisions summed over the whole corpus,
  geometric mean of p_1..p_n, brevity penalty ``exp(1 - r/c)`` when the candidates are shorter, where r
  sums, per candidate, the reference length closest to the candidate's (ties -> the shorter one). As in
  the COCO toolkit, a precision with no n-grams at all counts as ~1e-6 rather than raising.
- CIDEr-D (Vedantam et al. 2015): TF-IDF n-gram vectors (n = 1..4) with document frequencies taken over
  the reference sets of the evaluated corpus (so the score depends on the corpus, and a one-image corpus
  scores 0), clipped candidate weights, a Gaussian length penalty with sigma = 6, averaged over n and
  references, times 10.

METEOR needs the ``meteor-1.5.jar`` shipped in the ``pycocoevalcap`` wheel and ``java`` on PATH; without
either it is skipped and the result says why (``meteor_skipped``), never reported as 0.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence

MAX_N = 4
CIDER_SIGMA = 6.0
_WORD_RE = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:-[a-z0-9]+)*(?=n't)|[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation: ``"The dog's ball."`` -> ``["the", "dog", "'s", "ball"]``."""
    return _WORD_RE.findall(text.lower())


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check_aligned(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"sample {i}: references must be a non-empty list of strings, got {refs!r}")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = MAX_N) -> list[float]:
    """Corpus BLEU-1..``max_n`` of ``candidates[i]`` against the list ``references[i]``."""
    _check_aligned(candidates, references)
    correct, guessed = [0] * max_n, [0] * max_n
    cand_len_total, ref_len_total = 0, 0
    for cand, refs in zip(candidates, references):
        cand_tokens = tokenize(cand)
        ref_tokens = [tokenize(r) for r in refs]
        cand_len_total += len(cand_tokens)
        ref_len_total += min((abs(len(r) - len(cand_tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            cand_ngrams = ngram_counts(cand_tokens, n)
            max_ref = Counter()
            for r in ref_tokens:
                max_ref |= ngram_counts(r, n)  # element-wise max over references: the clipping limit
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in cand_ngrams.items())
            guessed[n - 1] += max(len(cand_tokens) - n + 1, 0)
    # The COCO toolkit's smoothing constants: they only matter when a count is 0.
    tiny, small = 1e-15, 1e-9
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guessed[n] + small)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (cand_len_total + tiny) / (ref_len_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _tfidf(counts_by_n: list[Counter], document_frequency: Counter, log_num_docs: float):
    """Per-n TF-IDF vectors, their norms, and the length CIDEr-D compares (the bigram count)."""
    vectors, norms = [], []
    for counts in counts_by_n:
        vec = {g: tf * (log_num_docs - math.log(max(1.0, document_frequency[g]))) for g, tf in counts.items()}
        vectors.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    # The reference implementation measures length as the number of bigrams (= words - 1 for two or more
    # words); both sides use it, so the length difference is the word-count difference.
    length = sum(counts_by_n[1].values()) if len(counts_by_n) > 1 else sum(counts_by_n[0].values())
    return vectors, norms, length


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = MAX_N,
            sigma: float = CIDER_SIGMA) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-sample CIDEr-D). Document frequencies come from ``references`` themselves."""
    _check_aligned(candidates, references)
    if not candidates:
        return float("nan"), []

    def counts(text: str) -> list[Counter]:
        tokens = tokenize(text)
        return [ngram_counts(tokens, n) for n in range(1, max_n + 1)]

    cand_counts = [counts(c) for c in candidates]
    ref_counts = [[counts(r) for r in refs] for refs in references]
    document_frequency = Counter()
    for refs in ref_counts:
        document_frequency.update({g for r in refs for by_n in r for g in by_n})
    log_num_docs = math.log(float(len(references)))

    per_sample = []
    for cand, refs in zip(cand_counts, ref_counts):
        cand_vec, cand_norm, cand_len = _tfidf(cand, document_frequency, log_num_docs)
        total_by_n = [0.0] * max_n
        for ref in refs:
            ref_vec, ref_norm, ref_len = _tfidf(ref, document_frequency, log_num_docs)
            length_penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                # CIDEr-D clips the candidate's weight at the reference's, so repeating a word never helps.
                dot = sum(min(w, ref_vec[n][g]) * ref_vec[n][g] for g, w in cand_vec[n].items() if g in ref_vec[n])
                if cand_norm[n] != 0 and ref_norm[n] != 0:
                    total_by_n[n] += dot / (cand_norm[n] * ref_norm[n]) * length_penalty
        per_sample.append(10.0 * (sum(total_by_n) / max_n) / len(refs))
    return sum(per_sample) / len(per_sample), per_sample


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot run here, or ``None`` when it can."""
    if shutil.which("java") is None:
        return "java is not on PATH"
    try:
        from pycocoevalcap.meteor.meteor import Meteor  # noqa: F401
    except ImportError:
        return "pycocoevalcap (which ships meteor-1.5.jar) is not installed: pip install -e '.[meteor]'"
    return None


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus METEOR, per-sample METEOR) from the official jar; call only when
    :func:`meteor_unavailable_reason` is ``None``. Text is pre-tokenised the same way as BLEU/CIDEr."""
    from pycocoevalcap.meteor.meteor import Meteor

    _check_aligned(candidates, references)
    scorer = Meteor()
    try:
        # The jar protocol is line based: a newline or '|' inside a caption would corrupt it.
        clean = lambda s: " ".join(tokenize(s)) or "."  # noqa: E731
        gts = {i: [clean(r) for r in refs] for i, refs in enumerate(references)}
        res = {i: [clean(c)] for i, c in enumerate(candidates)}
        score, per_sample = scorer.compute_score(gts, res)
    finally:
        try:
            scorer.meteor_p.kill()
        except Exception:  # noqa: BLE001 - best effort: the process may already be gone
            pass
    return float(score), [float(s) for s in per_sample]


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]], use_meteor: bool = True) -> dict:
    """BLEU-1..4, CIDEr-D and (if possible and asked for) METEOR of a corpus, with the sample count."""
    _check_aligned(candidates, references)
    scores: dict = {"num_samples": len(candidates)}
    if not candidates:
        return scores
    for n, value in enumerate(bleu(candidates, references), start=1):
        scores[f"bleu_{n}"] = value
    scores["cider_d"] = cider_d(candidates, references)[0]
    reason = meteor_unavailable_reason() if use_meteor else "disabled by the caller (--no-meteor)"
    if reason is None:
        scores["meteor"] = meteor(candidates, references)[0]
    else:
        scores["meteor"] = None
        scores["meteor_skipped"] = reason
    return scores
