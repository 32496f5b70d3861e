"""The frozen snapshot (the reference's ``old_model``): the weights at the start of the current phase.

It plays four parts (docs/method.md §1): the KL reference and the self-critical baseline of the describer,
the frozen partner of whichever role trains, and the source of the locator's pseudo-label captions.

Two implementations share one interface:

- ``FullSnapshot``: a second copy of the model. Frozen parameters (the ViT under ``fix_vit``) are shared
  with the policy instead of copied, since they never change. Under ZeRO-3 the copy is sharded like the
  policy and a re-sync copies each rank's own partition, so no rank ever holds the full model twice.
- ``AdapterSnapshot``: with LoRA, the snapshot is a second, frozen adapter (``"snapshot"``) on the same
  base model; a re-sync copies the adapter weights only.

Either way the snapshot runs in eval mode: no dropout in the frozen reference.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from trl.models.utils import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation as _trl_unwrap_model_for_generation

from sc_tune.moe import as_configured

SNAPSHOT_ADAPTER = "snapshot"
POLICY_ADAPTER = "default"


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns: its ZeRO-3 partition, or the whole parameter."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class Snapshot(ABC):
    @abstractmethod
    @contextmanager
    def generating(self):
        """Yields a module to call ``generate`` on (ZeRO-3 shards gathered once for the whole call)."""

    @abstractmethod
    @contextmanager
    def scoring(self):
        """Yields a module for a no-grad teacher-forced forward."""

    @abstractmethod
    def _pairs(self):
        """(snapshot tensor, policy tensor) pairs of everything a sync copies, this rank's part only."""

    @abstractmethod
    def named_local_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must store to restore the snapshot (this rank's part)."""

    @torch.no_grad()
    def sync_from_policy(self) -> None:
        for snapshot_tensor, policy_tensor in self._pairs():
            snapshot_tensor.copy_(policy_tensor)

    @torch.no_grad()
    def load_local_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.named_local_tensors()
        missing, unexpected = own.keys() - tensors.keys(), tensors.keys() - own.keys()
        if missing or unexpected:
            raise ValueError(
                f"snapshot checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, tensor in own.items():
            tensor.copy_(tensors[name])


class FullSnapshot(Snapshot):
    def __init__(self, policy: torch.nn.Module, accelerator, zero3: bool, device: torch.device):
        self.accelerator = accelerator
        self.policy = policy  # the unwrapped policy; its parameters are updated in place by the optimizer
        self.zero3 = zero3
        if zero3:
            # Built sharded (transformers wraps from_config in zero.Init under ZeRO-3); weights come from the
            # first sync, so nothing is loaded from disk twice.
            dtype = next(policy.parameters()).dtype
            module = type(policy)._from_config(policy.config, dtype=dtype)
            self.engine = prepare_deepspeed(module, accelerator)
            self.module = self.engine.module
        else:
            frozen = {id(p): p for p in policy.parameters() if not p.requires_grad}
            self.module = copy.deepcopy(policy, memo=frozen).to(device)
            self.engine = self.module
        self.module.eval()
        self.module.requires_grad_(False)  # the shared parameters are frozen already

    @contextmanager
    def generating(self):
        if self.zero3:
            with unwrapped_for_generation(self.engine, self.accelerator) as module:
                yield module
        else:
            yield self.module

    @contextmanager
    def scoring(self):
        yield self.engine

    def _pairs(self):
        policy_params = dict(self.policy.named_parameters())
        for name, param in self.module.named_parameters():
            source = policy_params[name]
            if param is not source:
                yield _local(param), _local(source)

    def named_local_tensors(self):
        policy_params = dict(self.policy.named_parameters())
        return {n: _local(p) for n, p in self.module.named_parameters() if p is not policy_params[n]}


@contextmanager
def unwrapped_for_generation(model, accelerator, **kwargs):
    """TRL's ``unwrap_model_for_generation`` (the bare module, ZeRO-3 shards gathered), without its hook leak.

    TRL turns gradient checkpointing off for the block and on again after it. transformers (5.x) registers a new
    forward hook on the input embeddings at every turn-on (``enable_input_require_grads``) and removes it at turn-off
    only for models with its own PEFT integration, so every generation left one more hook behind: three per describer
    rollout, one per locator step, each called in every later forward of the embeddings (every decode step of
    transformers' ``generate``), and each one a guard that made a compiled decode step recompile. Here the input
    embeddings keep exactly the hooks they had before the block."""
    root = accelerator.unwrap_model(model)
    models = [m for m in root.modules() if hasattr(m, "get_input_embeddings") and hasattr(m, "config")]
    embeddings = {}
    for m in models:
        try:
            embedding = m.get_input_embeddings()
        except NotImplementedError:
            continue
        if isinstance(embedding, torch.nn.Module):
            embeddings[id(embedding)] = (embedding, set(embedding._forward_hooks))
    handles = [(m, m.__dict__.get("_require_grads_hooks"), m.__dict__.get("_require_grads_hook")) for m in models]
    try:
        with _trl_unwrap_model_for_generation(model, accelerator, **kwargs) as module:
            yield module
    finally:
        for embedding, before in embeddings.values():
            for key in set(embedding._forward_hooks) - before:
                if getattr(embedding._forward_hooks[key], "__name__", "") == "make_inputs_require_grads":
                    del embedding._forward_hooks[key]
        for m, hooks, hook in handles:  # disable_input_require_grads must find the hooks that are still there
            for name, value in (("_require_grads_hooks", hooks), ("_require_grads_hook", hook)):
                if value is None:
                    m.__dict__.pop(name, None)
                else:
                    m.__dict__[name] = value


@contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block; each submodule's own mode is restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def active_adapter(model: torch.nn.Module, name: str):
    """Run LoRA layers with adapter ``name`` without touching ``requires_grad``.

    PEFT's ``set_adapter`` also marks the chosen adapter trainable, which would unfreeze the snapshot
    and freeze the policy mid-step; here only the layers' active-adapter pointer moves.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = name
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous):
            m._active_adapter = prev


@contextmanager
def row_adapters(model: torch.nn.Module, blocks: Sequence[tuple[str, int, int]]):
    """Run LoRA layers with adapter ``name`` on rows ``start:end`` of every input, for each ``(name, start, end)``.

    One decode loop then holds the policy's rows and the snapshot's (``sc_tune.decoding``): the base weights are read
    once per step for both. Each row gets its adapter's LoRA term, in PEFT's formula and dtypes
    (``base(x) + lora_B(lora_A(dropout(x))) * scaling``, the sum cast back to the base output's dtype), up to where the
    stacked terms apply the scaling and the matmuls' summation order (:class:`_StackedRowTerms`).

    Why not PEFT's ``adapter_names``: its mixed-batch path gathers each adapter's rows with a Python list of indices in
    every LoRA layer, a host-to-device copy per layer per step (196 per decode step on Qwen2.5-VL-7B) that CUDA graph
    capture refuses. Our rows come in contiguous blocks (sampled rows, then greedy rows).

    Why one term for all blocks (:class:`_StackedRowTerms`) rather than one per block: a decode step is a few thousand
    small kernels, each with a fixed cost on a GPU. Per block a LoRA layer launches five (two matmuls, scale, add, copy
    back), ten for two blocks; stacked it launches four for any number of blocks, as PEFT's forward of one adapter
    does, and three where equal blocks tile the call (batched matmuls; ``scripts/count_decode_ops.py``). Where a
    block's dropout is active (training mode, p > 0) each block runs on its own, as PEFT would drop out its rows.
    """
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError("row_adapters: the model has no LoRA linear layer")
    for layer in layers:
        for name, _, _ in blocks:
            if name not in layer.lora_A or name in layer.lora_variant or layer.use_dora.get(name, False):
                raise ValueError(f"row_adapters: adapter {name!r} is missing or not plain LoRA in {type(layer).__name__}")

    def add_block_terms(layer, args, output):
        x = args[0]
        for name, start, end in blocks:
            lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
            rows = layer._cast_input_dtype(x[start:end], lora_A.weight.dtype)
            term = lora_B(lora_A(layer.lora_dropout[name](rows))) * layer.scaling[name]
            output[start:end] = output[start:end] + term  # copied back in the output's dtype, as PEFT casts the sum
        return output

    previous = [layer._active_adapter for layer in layers]
    handles = []
    try:
        for layer in layers:
            layer._active_adapter = []  # the layer itself adds no adapter: the hook adds each block's
            stacked = _StackedRowTerms.for_layer(layer, blocks)
            handles.append(layer.register_forward_hook(add_block_terms if stacked is None else stacked))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer, prev in zip(layers, previous):
            layer._active_adapter = prev


class _StackedRowTerms:
    """Every block's LoRA term of one layer in two matmuls: the adapters' A matrices stacked along the rank,
    ``h = x @ [A_1; A_2]^T``; each row keeps its own adapter's columns, times that adapter's scaling, and zeroes the
    others; ``term = h' @ [B_1, B_2]^T``. Each row's term is PEFT's ``B(A x) * scaling`` for its adapter up to where
    the scaling is applied and the matmuls' summation order (the zeroed columns add exact zeros): the last bit at
    most, and nothing where the scaling is a power of two, as the default alpha / r = 16 / 64 is. The stacked weights
    are copies taken on entry: the adapters must not change while the context is open (they do not within a generate
    call). Rows outside every block get no term. Where equal blocks tile the call, batched matmuls take each block's
    own A and B * scaling instead (the same caveat on the scaling; no zeroed columns)."""

    def __init__(self, A_Rin: torch.Tensor, weights_B: list[torch.Tensor], ranks: list[int], scalings: list[float],
                 blocks: Sequence[tuple[str, int, int]]):
        self.A_Rin, self.weights_B = A_Rin, weights_B
        self.ranks, self.scalings, self.blocks = ranks, scalings, blocks
        self.keep: dict[tuple, torch.Tensor] = {}
        self._B_outR = None  # the stacked B, made on first use (the tiled path never needs it)
        # Blocks of equal size that tile the call (the fused describer loop: B sampled rows, then B greedy rows) and
        # adapters of one rank take batched matmuls instead: block b's rows times its own A_b, then its own
        # B_b * scaling_b. Three kernels (two batched matmuls and the add) instead of four, and no zeroed columns.
        self.A_bri = self.B_bro = None
        if len(set(ranks)) == 1:
            self.A_bri = A_Rin.view(len(ranks), ranks[0], -1)
            with torch.no_grad():
                self.B_bro = torch.stack([w.T * scaling for w, scaling in zip(weights_B, scalings)])

    @property
    def B_outR(self) -> torch.Tensor:
        if self._B_outR is None:
            with torch.no_grad():
                self._B_outR = torch.cat(self.weights_B, dim=1)
        return self._B_outR

    def _tiled(self, rows: int) -> bool:
        """Whether the blocks are ``len(blocks)`` equal runs of rows that cover all ``rows``, in order."""
        count = len(self.blocks)
        if self.A_bri is None or rows % count:
            return False
        size = rows // count
        return all((start, end) == (i * size, (i + 1) * size) for i, (_, start, end) in enumerate(self.blocks))

    @classmethod
    def for_layer(cls, layer, blocks: Sequence[tuple[str, int, int]]) -> _StackedRowTerms | None:
        names = [name for name, _, _ in blocks]
        weights_A = [layer.lora_A[name].weight for name in names]
        weights_B = [layer.lora_B[name].weight for name in names]
        dropouts_active = any(
            isinstance(layer.lora_dropout[name], torch.nn.Dropout) and layer.lora_dropout[name].training
            and layer.lora_dropout[name].p > 0 for name in names
        )
        same_kind = len({(w.dtype, w.device) for w in weights_A + weights_B}) == 1
        if dropouts_active or not same_kind or any(w.dim() != 2 for w in weights_A + weights_B):
            return None
        with torch.no_grad():
            A_Rin = torch.cat(weights_A, dim=0)
        return cls(A_Rin, weights_B, [w.shape[0] for w in weights_A], [layer.scaling[n] for n in names], blocks)

    def _keep(self, rows: int, ndim: int, device, dtype) -> torch.Tensor:
        """Each row's scaling on its own adapter's rank columns, 0 elsewhere, shaped to broadcast over an input of
        ``ndim`` dimensions; made once per shape (the prefill and the decode steps reuse it)."""
        key = (rows, ndim, device, dtype)
        if key not in self.keep:
            # Filled on the device (fills, not host-to-device copies, should a first call come during graph capture)
            keep_NR = torch.zeros(rows, sum(self.ranks), dtype=dtype, device=device)
            first = 0
            for rank, scaling, (_, start, end) in zip(self.ranks, self.scalings, self.blocks):
                keep_NR[start:end, first:first + rank] = scaling
                first += rank
            self.keep[key] = keep_NR.view(rows, *(1,) * (ndim - 2), -1)  # broadcast over the sequence axes
        return self.keep[key]

    def __call__(self, layer, args, output):
        x = layer._cast_input_dtype(args[0], self.A_Rin.dtype)
        if self._tiled(x.shape[0]):
            x_bti = x.reshape(len(self.blocks), -1, x.shape[-1])  # a block's rows (and their positions) in a row
            term = torch.bmm(torch.bmm(x_bti, self.A_bri.transpose(1, 2)), self.B_bro)
            output.add_(term.view(output.shape))  # summed in the wider dtype and cast back, as PEFT casts the sum
            return output
        keep_NR = self._keep(x.shape[0], x.dim(), x.device, self.A_Rin.dtype)
        term = torch.nn.functional.linear(torch.nn.functional.linear(x, self.A_Rin) * keep_NR, self.B_outR)
        output.add_(term)  # summed in the wider dtype and cast back, as PEFT casts the sum
        return output


class AdapterSnapshot(Snapshot):
    def __init__(self, trainer):
        self.trainer = trainer  # the policy engine exists only once training starts: look it up late
        peft_model = trainer.model
        with as_configured():  # the same modules and parameters as the policy's adapter (sc_tune.moe)
            peft_model.add_adapter(SNAPSHOT_ADAPTER, peft_model.peft_config[POLICY_ADAPTER])
        for name, param in peft_model.named_parameters():
            if f".{SNAPSHOT_ADAPTER}." in name:
                param.requires_grad_(False)

    # The snapshot shares the policy's modules, which are in training mode during a step. It runs in eval mode,
    # as the full-copy snapshot does: LoRA dropout must not make the frozen reference's captions, boxes and
    # log-probs random, and Qwen-VL in training mode with gradient checkpointing keeps no key/value cache.
    @contextmanager
    def generating(self):
        with (
            unwrapped_for_generation(
                self.trainer.model_wrapped,
                self.trainer.accelerator,
                gradient_checkpointing_kwargs=self.trainer.args.gradient_checkpointing_kwargs,
            ) as module,
            active_adapter(module, SNAPSHOT_ADAPTER),
            eval_mode(module),
        ):
            yield module

    @contextmanager
    def scoring(self):
        module = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        with active_adapter(module, SNAPSHOT_ADAPTER), eval_mode(module):
            yield self.trainer.model_wrapped

    def _params(self):
        return dict(self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped).named_parameters())

    def _pairs(self):
        params = self._params()
        for name, param in params.items():
            if f".{SNAPSHOT_ADAPTER}." in name:
                yield _local(param), _local(params[name.replace(f".{SNAPSHOT_ADAPTER}.", f".{POLICY_ADAPTER}.")])

    def named_local_tensors(self):
        return {n: _local(p) for n, p in self._params().items() if f".{SNAPSHOT_ADAPTER}." in n}


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def zero3_enabled(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def make_snapshot(trainer) -> Snapshot:
    """The snapshot of a trainer's policy: a second adapter under LoRA, else a full copy (sharded under ZeRO-3)."""
    if is_peft(trainer.model):
        return AdapterSnapshot(trainer)
    zero3 = trainer.is_deepspeed_enabled and zero3_enabled(trainer.accelerator)
    return FullSnapshot(trainer.model, trainer.accelerator, zero3, trainer.args.device)
