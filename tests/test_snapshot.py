"""The frozen snapshot's own bookkeeping: what a full copy shares with the policy, what a sync copies, and what a
checkpoint of it must hold (the trainer-level behaviour is in test_phases, test_lora and test_checkpoints)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sc_tune.snapshot import FullSnapshot, make_snapshot, zero3_enabled


def _policy() -> torch.nn.Module:
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    policy[0].requires_grad_(False)  # as a frozen vision tower (--fix_vit)
    return policy.train()


def test_a_full_snapshot_shares_the_frozen_parameters_and_copies_the_trained_ones_at_a_sync():
    policy = _policy()
    snapshot = FullSnapshot(policy, accelerator=None, zero3=False, device=torch.device("cpu"))
    assert snapshot.module[0].weight is policy[0].weight  # never copied: they never change
    assert snapshot.module[2].weight is not policy[2].weight
    assert sorted(snapshot.named_local_tensors()) == ["2.bias", "2.weight"]  # what a checkpoint stores
    assert not snapshot.module.training and not any(p.requires_grad for p in snapshot.module.parameters())
    assert policy.training and policy[2].weight.requires_grad  # the policy is left as it was
    with torch.no_grad():
        policy[2].weight.add_(1.0)
    assert not torch.equal(snapshot.module[2].weight, policy[2].weight)  # frozen until the phase switch
    snapshot.sync_from_policy()
    assert torch.equal(snapshot.module[2].weight, policy[2].weight)
    assert snapshot.module[2].weight is not policy[2].weight


def test_a_snapshot_checkpoint_of_another_model_is_refused_naming_what_differs():
    snapshot = FullSnapshot(_policy(), accelerator=None, zero3=False, device=torch.device("cpu"))
    saved = {name: tensor.clone() + 1 for name, tensor in snapshot.named_local_tensors().items()}
    before = {name: tensor.clone() for name, tensor in snapshot.named_local_tensors().items()}
    missing = dict(saved)
    del missing["2.bias"]
    extra = {**saved, "3.weight": torch.zeros(1)}
    for tensors, named in ((missing, r"missing \['2.bias'\], unexpected \[\]"),
                           (extra, r"missing \[\], unexpected \['3.weight'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=named):
            snapshot.load_local_tensors(tensors)
        for name, tensor in snapshot.named_local_tensors().items():  # refused before anything is copied
            assert torch.equal(tensor, before[name]), name
    snapshot.load_local_tensors(saved)
    for name, tensor in snapshot.named_local_tensors().items():
        assert torch.equal(tensor, saved[name]), name


def _trainer(zero_stage: int | None, deepspeed: bool) -> SimpleNamespace:
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(model=_policy(), is_deepspeed_enabled=deepspeed,
                           accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
                           args=SimpleNamespace(device=torch.device("cpu")))  # fmt: skip


def test_only_zero_3_shards_the_full_snapshot():
    """ZeRO-2 and plain runs keep a whole copy on each rank; only ZeRO-3 builds the copy sharded."""
    assert [zero3_enabled(_trainer(stage, True).accelerator) for stage in (None, 1, 2, 3)] == [False] * 3 + [True]
    for stage, deepspeed in ((None, False), (2, True)):
        snapshot = make_snapshot(_trainer(stage, deepspeed))
        assert isinstance(snapshot, FullSnapshot) and not snapshot.zero3 and snapshot.engine is snapshot.module
