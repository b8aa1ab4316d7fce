"""What besides W and U decides the stored rows, checked like W and U (a new-user trial's findings):

- the pretrained model's persistent floating-point buffers (batch norm running statistics):
  fingerprinted; another value is refused at attach (before: accepted silently, scores computed
  against stale rows); non-persistent ones (caches) are not;
- the task's pretrain_weight_decay (part of G and its Hessian): recorded; another value is refused
  at attach, and a rerun of the build with it is another build;
- an index written before these were recorded is still reused and attached;
- frozen finetuning whose finetuned model's W buffers moved (batch norm statistics updated while
  finetuning) is refused at load and at attach, as a changed W is;
- losses of an integer dtype are refused when the task is loaded (before: only at the build);
- a frozen W that differs because the two models have different dtypes says so.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from msif_index.build import build_index
from msif_index.config import BuildConfig
from msif_index.errors import ConfigError, IndexMismatchError, TaskError
from msif_index.index import InfluenceIndex
from msif_index.task import validate_task
from tests.held_task import HeldTask, random_data


class _BNNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, classes)
        # a cache a forward pass may fill (as rotary tables are): not state, not fingerprinted
        self.embed.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.embed(x))))


class BNTask(HeldTask):
    shared_parameters = ("embed.weight", "embed.bias", "bn.weight", "bn.bias")
    pretrain_weight_decay = 0.01

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.pre, self.fin = _BNNet(3).double().eval(), _BNNet(2).double().eval()
        with torch.no_grad():
            self.pre.bn.running_mean.copy_(0.1 * torch.randn(6, generator=g, dtype=torch.float64))
            self.pre.bn.running_var.copy_(1 + torch.rand(6, generator=g, dtype=torch.float64))
        self.fin.embed.load_state_dict(self.pre.embed.state_dict())
        self.fin.bn.load_state_dict(self.pre.bn.state_dict())
        self.data = random_data(g, ((24, 3), (10, 2), (4, 2)))


CFG = BuildConfig(proj_dim=8, preconditioner="identity", shard_rows=16)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _rows(path):
    from msif_index.store import RowStore
    with RowStore.open(path / "rows.h5") as s:
        return s.read(0, s.n)


@pytest.fixture(scope="module")
def bn_index(tmp_path_factory):
    return build_index(BNTask(), tmp_path_factory.mktemp("bn") / "idx", CFG)


def test_buffers_and_weight_decay_are_recorded_and_checked_at_attach(bn_index):
    manifest = json.loads((bn_index / "manifest.json").read_text())
    assert manifest["identity"]["pretrain_weight_decay"] == 0.01
    assert set(manifest["fingerprints"]) == {"W", "U", "buffers"}
    with InfluenceIndex.open(bn_index) as index:
        index.attach(BNTask())                                        # the same task: fine
        cached = BNTask()
        cached.pre.embed.cache.fill_(1.0)
        cached.fin.embed.cache.fill_(2.0)
        validate_task(cached)
        index.check_pretrained(cached)                                # non-persistent buffers: not checked

        moved = BNTask()
        with torch.no_grad():
            moved.pre.bn.running_mean.add_(0.5)
            moved.fin.bn.running_mean.add_(0.5)                       # (frozen: the finetuned copy too)
        with pytest.raises(IndexMismatchError) as e:
            index.attach(moved)
        assert "buffers" in _one_line(e) and "rebuild the index" in _one_line(e)

        decayed = BNTask()
        decayed.pretrain_weight_decay = 0.02
        with pytest.raises(IndexMismatchError) as e:
            index.attach(decayed)
        assert "pretrain_weight_decay is 0.02 but this index was built with 0.01" in _one_line(e)


def test_a_rerun_with_another_weight_decay_is_another_build(bn_index):
    before = _rows(bn_index)
    decayed = BNTask()
    decayed.pretrain_weight_decay = 0.02
    with pytest.raises(ConfigError) as e:
        build_index(decayed, bn_index, CFG)
    assert "pretrain_weight_decay" in _one_line(e) and "overwrite" in _one_line(e)
    assert np.array_equal(_rows(bn_index), before)
    assert build_index(BNTask(), bn_index, CFG) == bn_index            # the same task: reused


def test_an_index_from_before_these_were_recorded_is_reused_and_attached(tmp_path, bn_index):
    with InfluenceIndex.open(bn_index) as index:     # a manifest without them (rows.h5 holds the identity too)
        del index.manifest["identity"]["pretrain_weight_decay"]
        del index.manifest["fingerprints"]["buffers"]
        changed = BNTask()
        changed.pretrain_weight_decay = 0.02
        with torch.no_grad():
            changed.pre.bn.running_mean.add_(0.5)
        with pytest.warns(RuntimeWarning, match="pretrain_loss gives other values"):   # (its probe still does)
            index.check_pretrained(changed)                           # nothing recorded to compare
    path = build_index(BNTask(), tmp_path / "old", CFG)
    for name in ("manifest.json", "build.json"):                      # as the previous version wrote them
        d = json.loads((path / name).read_text())
        del d["identity"]["pretrain_weight_decay"]
        del d["identity"]["fingerprints"]["buffers"]
        if "fingerprints" in d:
            del d["fingerprints"]["buffers"]
        (path / name).write_text(json.dumps(d))
    before = (path / "manifest.json").read_bytes()
    assert build_index(BNTask(), path, CFG) == path                   # reused, not refused
    assert (path / "manifest.json").read_bytes() == before


def test_frozen_finetuned_model_with_moved_batch_norm_statistics_is_refused(bn_index):
    task = BNTask()
    validate_task(task)
    moved = copy.deepcopy(task.fin).train()
    with torch.no_grad():
        moved(task.data[1].tensors[0])                                # one train-mode pass moves its statistics
    moved.eval()
    with InfluenceIndex.open(bn_index) as index:
        with pytest.raises(IndexMismatchError) as e:
            index.attach(task, finetuned=moved)
        assert "bn.running_mean" in _one_line(e) and "eval mode" in _one_line(e)
    task.fin = moved
    with pytest.raises(TaskError) as e:
        validate_task(task)
    assert "buffers of W's modules differ" in _one_line(e) and "bn.running_mean" in _one_line(e)
    task.finetuning, task.alpha = "proximal", 1.0                       # W (and its statistics) may move
    validate_task(task)


def test_integer_losses_are_refused_when_the_task_is_loaded():
    task = BNTask()
    task.finetune_loss = lambda model, batch: batch[1]                 # labels: int64, one per example
    with pytest.raises(TaskError) as e:
        validate_task(task)
    assert "finetune_loss must return floating-point losses" in _one_line(e) and "int64" in _one_line(e)


def test_frozen_w_of_another_dtype_names_the_dtypes():
    """(before: "differs (max |difference| 3e-08)", which hid the cause)"""
    task = BNTask()
    task.fin = copy.deepcopy(task.fin).float()     # the buffers' float64 values do not survive the cast
    with pytest.raises(TaskError) as e:
        validate_task(task)
    assert "bn.running_mean" in _one_line(e) and "float64 in pretrained_model() and float32" in _one_line(e)
    with torch.no_grad():                          # W values float32 cannot hold
        task.pre.embed.weight.add_(1e-10)
    with pytest.raises(TaskError) as e:
        validate_task(task)
    assert "'embed.weight' is float64 in pretrained_model() and float32 in finetuned_model()" in _one_line(e)


def test_retraining_cache_key_covers_buffers_and_keeps_older_keys_without_them(monkeypatch):
    """Leave-out retraining caches (msif evaluate) are keyed by the task: a moved batch norm statistic
    is another key; a model without buffers keeps the key of versions that fingerprinted W and U
    only, so its existing caches stay valid."""
    import msif_index.evaluation.retraining as R
    task = BNTask()
    key = R.task_fingerprint(task, "auto")
    with torch.no_grad():
        task.pre.bn.running_var.mul_(1.001)
    assert R.task_fingerprint(task, "auto") != key

    plain = BNTask()
    plain.pre.bn.track_running_stats = False                    # no buffers left in the pretrained model
    plain.pre.bn.running_mean = plain.pre.bn.running_var = plain.pre.bn.num_batches_tracked = None
    from msif_index.task import state_buffers
    assert not state_buffers(plain.pre)                         # (its non-persistent cache is no state)
    new_key = R.task_fingerprint(plain, "auto")
    real = R.pretrained_fingerprints
    monkeypatch.setattr(R, "pretrained_fingerprints",
                        lambda t, m: {k: v for k, v in real(t, m).items() if k in ("W", "U")})   # the older form
    assert R.task_fingerprint(plain, "auto") == new_key
