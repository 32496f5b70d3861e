"""Time one decode step's attention on a grouped-query model, compiled: transformers' SDPA against SC-Tune's.

    python scripts/bench_decode_attention.py                    # Qwen2.5-VL-7B's attention, 128 rows, CPU, float32
    python scripts/bench_decode_attention.py --device cuda --dtype bfloat16

Under ``torch.compile`` (the trainer's ``--decoding_compile_backend``) transformers' SDPA copies every key/value
head once per query head it serves (``repeat_kv``) before it attends; SC-Tune's decode step attends with the query
heads of each key/value head as that head's query rows (``sc_tune.decoding._decode_attention``), reading every
cached key and value once. Both functions are compiled with the same backend (``aot_eager`` on CPU, ``inductor``
elsewhere) and timed on one layer's inputs: one query token per row against a cache of ``--cache`` columns, the
last tenth of each row's columns masked (positions not yet written). Printed per path: the median milliseconds
per layer over ``--repeats`` calls and for every layer of the model, and the bytes of keys and values each path
reads and writes per step (by arithmetic). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_configs import CONFIGS  # noqa: E402  (scripts/, the script's own folder)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from sc_tune.decoding import _decode_attention  # noqa: E402

# Qwen2.5-VL-7B's language model, as the GPU check builds it (28 layers, 28 query heads, 4 key/value heads of 128).
_SIZES = CONFIGS["qwen2.5-vl-7b"].sizes
QWEN2_5_VL_7B = {"layers": _SIZES["layers"], "heads": _SIZES["text_heads"], "kv_heads": _SIZES["text_kv_heads"],
                 "head_dim": _SIZES["hidden"] // _SIZES["text_heads"]}


def _timed(function, inputs, device, repeats: int) -> float:
    """Median milliseconds of ``function(*inputs)`` over ``repeats`` calls, after three warm-up calls."""
    times = []
    for index in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="rows per decode step (generation batch 64, fused)")
    parser.add_argument("--cache", type=int, default=350, help="cache columns: ~320 prompt tokens + 30 new")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: aot_eager on CPU, "
                        "else inductor)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backend = args.backend or ("aot_eager" if device.type == "cpu" else "inductor")
    shape = QWEN2_5_VL_7B
    groups = shape["heads"] // shape["kv_heads"]

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = groups, True
    generator = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    query_BH1D = randn(args.rows, shape["heads"], 1, shape["head_dim"])
    key_BHLD = randn(args.rows, shape["kv_heads"], args.cache, shape["head_dim"])
    value_BHLD = randn(args.rows, shape["kv_heads"], args.cache, shape["head_dim"])
    keep_B11L = torch.ones(args.rows, 1, 1, args.cache, dtype=torch.bool, device=device)
    keep_B11L[..., args.cache - args.cache // 10:] = False
    inputs = (module, query_BH1D, key_BHLD, value_BHLD, keep_B11L)

    paths = {"transformers_sdpa": sdpa_attention_forward, "sc_tune": _decode_attention}
    outputs, ms = {}, {}
    for name, function in paths.items():
        torch._dynamo.reset()
        compiled = torch.compile(function, backend=backend, dynamic=False)
        outputs[name] = compiled(*inputs)[0].float()
        ms[name] = _timed(compiled, inputs, device, args.repeats)
    # The two must attend alike, or the timing compares different work.
    torch.testing.assert_close(outputs["sc_tune"], outputs["transformers_sdpa"],
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)

    kv_bytes = 2 * key_BHLD.numel() * key_BHLD.element_size()  # keys and values of one layer
    copied = kv_bytes * groups  # the repeated heads: written once, read once by the attention
    traffic = {"transformers_sdpa": kv_bytes + 2 * copied, "sc_tune": kv_bytes}
    result = {"device": str(device), "dtype": args.dtype, "backend": backend, "rows": args.rows,
              "cache": args.cache, **shape, "torch": torch.__version__}
    for name in paths:
        per_layer = ms[name]
        result[name] = {"ms_per_layer": round(per_layer, 3), "ms_per_step": round(per_layer * shape["layers"], 2),
                        "kv_bytes_per_step": traffic[name] * shape["layers"]}
        print(f"{name}: {per_layer:.3f} ms per layer, {per_layer * shape['layers']:.2f} ms per step of "
              f"{shape['layers']} layers, {traffic[name] * shape['layers'] / 1e9:.2f} GB of keys and values read "
              "and written")
    result["speedup"] = round(ms["transformers_sdpa"] / ms["sc_tune"], 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
