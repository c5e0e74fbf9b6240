"""Checkpoint state round trip without Flower processes: FedAdam's moments and the privacy
guard's accountants come back from state.pt into a freshly built strategy chain; a model
that no longer matches its recorded SHA-256 is refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import strategies
from fl_app.checkpoint import (
    commit_round,
    load_checkpoint,
    model_file,
    restore_strategy,
    save_round_model,
    strategy_state,
)
from fl_app.config import compose_config
from fl_app.privacy_ledger import find_guard
from fl_app.run_folder import RunFolder


def _base(strategy):  # FedAdam under the PrivacyGuard
    node = strategy
    while hasattr(node, "strategy"):
        node = vars(node)["strategy"]
    return node


def test_strategy_state_survives_a_save_and_load(tmp_path: Path) -> None:
    cfg = compose_config("strategy=fedadam privacy=local_dp")
    before = strategies.build(cfg, 3, node_sites={1: "a", 2: "b", 3: "c"})
    base = _base(before)
    base.m_t = {"w": np.arange(4, dtype=np.float32)}
    base.v_t = {"w": np.full(4, 0.5, dtype=np.float32)}
    guard = find_guard(before)
    guard.site_states["a"].record([(1.1, 0.1, 20)])
    guard.last_spend["a"] = {"epsilon": 1.5, "round": 2}
    guard.excluded["c"] = "budget exhausted in round 2"
    buffer = io.BytesIO()
    torch.save(strategy_state(before), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # nothing but tensors and plain data

    after = strategies.build(cfg, 3, node_sites={7: "a", 8: "b", 9: "c"})  # new node ids
    restore_strategy(after, saved)
    np.testing.assert_array_equal(_base(after).m_t["w"], base.m_t["w"])
    np.testing.assert_array_equal(_base(after).v_t["w"], base.v_t["w"])
    restored = find_guard(after)
    assert restored.site_states["a"].epsilon() == pytest.approx(
        guard.site_states["a"].epsilon())
    assert restored.site_states["a"].epsilon() > 0
    assert restored.last_spend == {"a": {"epsilon": 1.5, "round": 2}}
    assert restored.excluded == {"c": "budget exhausted in round 2"}

    other = strategies.build(compose_config("strategy=fedavg"), 3)
    with pytest.raises(ValueError, match="strategy chain"):
        restore_strategy(other, saved)


def test_a_swapped_round_model_is_refused_at_resume(tmp_path: Path) -> None:
    run = RunFolder.create(compose_config(f"output_dir={tmp_path}"))
    strategy = strategies.build(compose_config(""), 3)
    sha = save_round_model(run, 1, {"w": torch.ones(2)})
    commit_round(run, 1, sha, strategy)
    ckpt, model = load_checkpoint(run.path)
    assert ckpt.server_round == 1 and torch.equal(model["w"], torch.ones(2))
    torch.save({"w": torch.zeros(2)}, run.path / model_file(1))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_checkpoint(run.path)
