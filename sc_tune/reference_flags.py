"""The reference release's launch flags that transformers 5 no longer parses, and unknown flags.

The reference's ``finetune_ds.sh`` passes ``--model_max_length 384``, ``--warmup_ratio 0.0`` and
``--evaluation_strategy "no"``. Transformers 5 has none of them (``evaluation_strategy`` became ``eval_strategy``,
``warmup_ratio`` was folded into ``warmup_steps``), so ``HfArgumentParser`` ends in a traceback about "arguments
not used". Each is taken out of the command line here, before parsing, and given a clear meaning:

- ``--model_max_length N``: accepted and without effect, as in the reference, which passed it to the tokenizer but
  never asked for truncation (``docs/method.md``); caption and box lengths are ``--describer_max_new_tokens`` and
  ``--locator_max_new_tokens``. A note says so at start-up.
- ``--warmup_ratio``: only 0 (the reference's value) is accepted: each phase runs at its constant LR.
- ``--evaluation_strategy``: only ``no`` (the reference's value) is accepted: SC-Tune has no evaluation data during
  training; ``evaluate.py`` scores a checkpoint.

Any other flag the parser does not know is an :class:`ArgumentError` naming it.
"""

from __future__ import annotations

from sc_tune.arguments import ArgumentError


def _model_max_length(value: str) -> str:
    try:
        length = int(value)
    except ValueError:
        raise ArgumentError(f"--model_max_length {value!r} must be a positive integer") from None
    if length < 1:
        raise ArgumentError(f"--model_max_length {value!r} must be a positive integer")
    return (f"--model_max_length {length} has no effect: the reference passed it to the tokenizer without asking for "
            "truncation, and SC-Tune never truncates (caption and box lengths: --describer_max_new_tokens, "
            "--locator_max_new_tokens)")


def _warmup_ratio(value: str) -> str:
    try:
        ratio = float(value)
    except ValueError:
        raise ArgumentError(f"--warmup_ratio {value!r} must be a number (and 0: SC-Tune has no warmup)") from None
    if ratio != 0:
        raise ArgumentError(f"--warmup_ratio {value} is not used by SC-Tune: each phase starts at its full, constant "
                            "LR (--describer_lr / --locator_lr); only 0, the reference's value, is accepted")
    return "--warmup_ratio 0 accepted (SC-Tune has no warmup)"


def _evaluation_strategy(value: str) -> str:
    if value.strip().lower() != "no":
        raise ArgumentError(f"--evaluation_strategy {value!r} is not used by SC-Tune: there is no evaluation data "
                            "during training; score a checkpoint with evaluate.py (only 'no', the reference's value, "
                            "is accepted)")
    return "--evaluation_strategy no accepted (SC-Tune evaluates with evaluate.py, after training)"


REFERENCE_FLAGS = {
    "model_max_length": _model_max_length,
    "warmup_ratio": _warmup_ratio,
    "evaluation_strategy": _evaluation_strategy,
}


def take_reference_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command line without the reference's flags, a note per accepted flag); a refused value raises
    :class:`ArgumentError`. ``--flag value`` and ``--flag=value`` are both read; dashes may stand for underscores."""
    rest, notes = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        name, _, inline = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        check = REFERENCE_FLAGS.get(name.replace("-", "_"))
        if check is None:
            rest.append(word)
            i += 1
            continue
        if "=" in word:
            value, i = inline, i + 1
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            raise ArgumentError(f"{word} needs a value")
        notes.append(check(value))
    return rest, notes


def refuse_unknown(remaining: list[str], program: str) -> None:
    """The parser's leftovers are flags it does not know: an error that names them, never a traceback."""
    if remaining:
        raise ArgumentError(f"unknown argument(s): {' '.join(remaining)} (see `python {program} --help`)")
