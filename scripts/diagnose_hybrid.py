"""Why a tiny hybrid Qwen3.5 (Gated DeltaNet + full attention) did not learn the warm-start describer: the measurements.

    python scripts/diagnose_hybrid.py padding  [--layer_types P] [--init reference|transformers] [--checkpoint DIR]
    python scripts/diagnose_hybrid.py decay    [--layer_types P] [--init ...] [--checkpoint DIR]
    python scripts/diagnose_hybrid.py grads    [--layer_types P] [--init ...] [--checkpoint DIR]
    python scripts/diagnose_hybrid.py overfit  [--layer_types P] [--init ...] [--steps 300] [--lr 1e-3]

Every command builds the warm start's model (``sc_tune.synthetic.warm_start.build_model``: hidden 128, 4/2 heads,
vision width 64; the layer pattern ``--layer_types``, default the released 3:1 pattern) or loads ``--checkpoint``,
and the warm start's own examples (``scene_samples``: the prompts the trainer and evaluator use), and prints one
JSON object.

- ``padding``: each row alone against the same row left-padded in a batch, in training mode with gradient
  checkpointing, through whatever kernels transformers picks here (the torch fallbacks unless
  flash-linear-attention / causal-conv1d are installed; the output names them): largest logit difference on the
  row's real positions and the row's loss both ways. Then the same batch with the pad *token* changed (still masked):
  if the recurrent or convolution state saw pad positions, the real positions' logits would move. A control runs the
  batch with the linear-attention layers' padding mask withheld, to show the check sees a leak when there is one.
- ``decay``: per head of each Gated DeltaNet layer, the state's decay per token, exp(g), averaged over the describer
  prompts' real tokens, and what is left of it after the distance from the box's first coordinate to the answer
  (the farthest over the rows).
- ``grads``: gradient norms per text layer and part (token mixer, MLP; the decay parameters A_log and dt_bias
  apart) on a describer batch and on a locator batch.
- ``overfit``: 16 describer examples, trained with AdamW until the loss is near 0; then the greedy captions
  (``sc_tune.rollout.describe``) against the targets.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sc_tune.modeling import load_model_and_adapter  # noqa: E402
from sc_tune.rollout import GenerationSettings, describe  # noqa: E402
from sc_tune.synthetic.shapes import render, scene_stream  # noqa: E402
from sc_tune.synthetic.warm_start import WarmStartConfig, build_model, scene_samples  # noqa: E402

RELEASED_PATTERN = "linear_attention,linear_attention,linear_attention,full_attention"


def model_and_adapter(args):
    from sc_tune.adapters import adapter_class

    if args.checkpoint:
        model, adapter = load_model_and_adapter(args.checkpoint, dtype=torch.float32)
        return model, adapter, WarmStartConfig(model_type=model.config.model_type)
    cfg = WarmStartConfig(model_type=args.model_type, layers=len(args.layer_types.split(",")),
                          text_layer_types=args.layer_types, linear_attention_init=args.init, seed=args.seed,
                          hidden=args.hidden)
    model, tokenizer, image_processor = build_model(cfg)
    return model, adapter_class(cfg.model_type)(tokenizer, image_processor), cfg


def examples(adapter, cfg: WarmStartConfig, count: int, role: str | None = None, seed: int = 5):
    """``count`` warm-start samples (describer and locator alternate; ``role`` keeps one of them) and the scenes'
    objects they describe, from a scene stream of the held-out layout (2-4 objects)."""
    rng = random.Random(seed)
    scenes = scene_stream(seed, cfg.spec)
    picked, objects = [], []
    while len(picked) < count:
        scene = next(scenes)
        image = adapter.prepare_image(render(scene, cfg.spec))
        samples = scene_samples(scene, image, adapter, rng, cfg)
        for k, sample in enumerate(samples):
            is_describer = k % 2 == 0
            if role is None or (role == "describer") == is_describer:
                picked.append(sample)
                objects.append(scene.objects[k // 2])
    return picked[:count], objects[:count]


def row_losses(logits_BTV, labels_BT):
    """Mean cross-entropy over each row's target tokens (the causal shift as in transformers)."""
    logits, labels = logits_BTV[:, :-1], labels_BT[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counted = (labels != -100).float()
    return (token_loss * counted).sum(1) / counted.sum(1)


def kernels_in_use() -> dict:
    from transformers.utils import import_utils

    found = {}
    for name in ("is_flash_linear_attention_available", "is_causal_conv1d_available"):
        check = getattr(import_utils, name, None)
        found[name] = bool(check()) if check is not None else "unknown"
    return found


def cmd_padding(args) -> dict:
    model, adapter, cfg = model_and_adapter(args)
    samples, _ = examples(adapter, cfg, args.rows)
    model.train()
    model.gradient_checkpointing_enable()
    batch = adapter.build_batch([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])
    widths = batch.inputs["attention_mask"].sum(1).tolist()
    batched = model(**batch.inputs, labels=batch.labels).logits.detach()
    batched_loss = row_losses(batched, batch.labels)
    rows = []
    for i, s in enumerate(samples):
        alone = adapter.build_batch([s.prompt], [s.image], [s.target])
        logits = model(**alone.inputs, labels=alone.labels).logits.detach()
        n = logits.shape[1]
        rows.append({"real_tokens": n, "pads": batch.input_ids.shape[1] - n,
                     "max_logit_diff": (batched[i, -n:] - logits[0]).abs().max().item(),
                     "loss_alone": row_losses(logits, alone.labels)[0].item(), "loss_in_batch": batched_loss[i].item()})
    # The pad token changed (still masked): real positions must not move.
    other_pad = dict(batch.inputs)
    pad = batch.inputs["attention_mask"] == 0
    other_pad["input_ids"] = torch.where(pad, torch.full_like(batch.input_ids, adapter.encode_target("red")[0]),
                                         batch.input_ids)
    swapped = model(**other_pad).logits.detach()
    real = ~pad
    pad_token_effect = (swapped - batched)[real].abs().max().item()
    # Control: the same batch with the padding mask withheld from the linear-attention layers only.
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    original = qwen3_5.create_recurrent_attention_mask
    qwen3_5.create_recurrent_attention_mask = lambda **kwargs: None
    try:
        leaked = model(**other_pad).logits.detach()
    finally:
        qwen3_5.create_recurrent_attention_mask = original
    return {"command": "padding", "layer_types": model.config.text_config.layer_types, "kernels": kernels_in_use(),
            "training": model.training, "gradient_checkpointing": model.is_gradient_checkpointing,
            "widths": widths, "rows": rows,
            "max_logit_diff_alone_vs_batch": max(r["max_logit_diff"] for r in rows),
            "max_loss_diff_alone_vs_batch": max(abs(r["loss_alone"] - r["loss_in_batch"]) for r in rows),
            "max_logit_change_when_pad_token_changes": pad_token_effect,
            "control_without_linear_attention_mask": (leaked - batched)[real].abs().max().item()}


def box_to_answer_tokens(adapter, image, box_norm) -> int:
    """Tokens from the describer prompt's first box coordinate to its last token, where the caption's first token is
    read: how far a Gated DeltaNet state has to carry the box.

    The first coordinate is where the prompt first differs from the same prompt about another box. Two other boxes
    whose first coordinates start with different digits: the box's first token differs from at least one of them.
    (Looking for the first digit instead finds the 2 of a field name such as ``bbox_2d``.)"""
    ids = adapter.encode_prompt(adapter.describer_prompt(box_norm, image), image)

    def shared_prefix(other_box) -> int:
        other = adapter.encode_prompt(adapter.describer_prompt(other_box, image), image)
        return next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))

    first_coordinate = min(shared_prefix((0.1, 0.1, 0.2, 0.2)), shared_prefix((0.6, 0.6, 0.9, 0.9)))
    return len(ids) - 1 - first_coordinate


def gated_deltanet_layers(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("GatedDeltaNet")]


def cmd_decay(args) -> dict:
    model, adapter, cfg = model_and_adapter(args)
    samples, objects = examples(adapter, cfg, args.rows, role="describer")
    batch = adapter.build_batch([s.prompt for s in samples], [s.image for s in samples])
    real = batch.inputs["attention_mask"].bool()
    # The farthest any of the rows' boxes sits from its answer (coordinates of fewer digits sit nearer).
    distance = max(box_to_answer_tokens(adapter, s.image, o.bbox) for s, o in zip(samples, objects))
    captured = {}
    hooks = [m.in_proj_a.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, out))
             for name, m in gated_deltanet_layers(model)]
    model.eval()
    with torch.no_grad():
        model(**batch.inputs)
    for h in hooks:
        h.remove()
    layers = {}
    for name, m in gated_deltanet_layers(model):
        a = captured[name][real]  # real tokens x heads
        g = -m.A_log.float().exp() * torch.nn.functional.softplus(a.float() + m.dt_bias)
        decay = g.exp().mean(0)
        layers[name] = {"A": m.A_log.exp().tolist(), "softplus_dt_bias": torch.nn.functional.softplus(m.dt_bias).tolist(),
                        "mean_decay_per_token": decay.tolist(),
                        "left_after_box_distance": g.mean(0).mul(distance).exp().tolist()}
    return {"command": "decay", "layer_types": model.config.text_config.layer_types,
            "box_to_answer_tokens": distance, "layers": layers}


def layer_part(name: str) -> str | None:
    if ".language_model.layers." not in name:
        return None
    index = name.split(".language_model.layers.")[1].split(".")[0]
    if name.endswith(("A_log", "dt_bias")):
        part = "decay (A_log, dt_bias)"
    elif ".linear_attn." in name:
        part = "linear_attn"
    elif ".self_attn." in name:
        part = "self_attn"
    elif ".mlp." in name:
        part = "mlp"
    else:
        part = "norms"
    return f"layer {index} {part}"


def cmd_grads(args) -> dict:
    model, adapter, cfg = model_and_adapter(args)
    model.train()
    result = {"command": "grads", "layer_types": model.config.text_config.layer_types}
    for role in ("describer", "locator"):
        samples, _ = examples(adapter, cfg, args.rows, role=role)
        batch = adapter.build_batch([s.prompt for s in samples], [s.image for s in samples],
                                    [s.target for s in samples])
        model.zero_grad(set_to_none=True)
        model(**batch.inputs, labels=batch.labels).loss.backward()
        norms: dict[str, float] = {}
        for name, p in model.named_parameters():
            part = layer_part(name)
            if part is not None and p.grad is not None:
                norms[part] = norms.get(part, 0.0) + p.grad.pow(2).sum().item()
        result[role] = {k: v ** 0.5 for k, v in sorted(norms.items())}
    return result


def cmd_overfit(args) -> dict:
    model, adapter, cfg = model_and_adapter(args)
    samples, objects = examples(adapter, cfg, 16, role="describer")
    # Known targets: the full caption for even rows, the terse one for odd rows (both kinds of answer to fit).
    targets = [(o.full_caption if i % 2 == 0 else o.terse_caption) for i, o in enumerate(objects)]
    samples = [replace(s, target=adapter.describer_target(t)) for s, t in zip(samples, targets)]
    batch = adapter.build_batch([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    curve, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(**batch.inputs, labels=batch.labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == 1:
            curve.append((step, round(loss.item(), 4)))
    model.eval()
    _, completions = describe(model, adapter, [s.image for s in samples], [o.bbox for o in objects],
                              GenerationSettings(max_new_tokens=8))
    right = sum(c == t for c, t in zip(completions.texts, targets))
    return {"command": "overfit", "layer_types": model.config.text_config.layer_types, "init": args.init,
            "lr": args.lr, "loss_curve": curve, "greedy_captions_right": f"{right}/16",
            "captions": list(zip(completions.texts, targets)), "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("padding", "decay", "grads", "overfit"))
    parser.add_argument("--model_type", default="qwen3_5")
    parser.add_argument("--layer_types", default=RELEASED_PATTERN)
    parser.add_argument("--init", default="reference", choices=("reference", "transformers"))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--checkpoint", default="", help="a saved warm-start step folder instead of a fresh model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"padding": cmd_padding, "decay": cmd_decay, "grads": cmd_grads, "overfit": cmd_overfit}[args.command](args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
