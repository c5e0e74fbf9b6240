"""DP-SGD step time / non-private step time, per Opacus ``grad_sample_mode``, on our models.

    python -m benchmarks.dp_step --out DIR            # chest X-ray CNN + breast-cancer MLP
    python -m benchmarks.dp_step --out DIR --tiny     # breast-cancer MLP, a few steps

Each model is the task's own (``task.build_model``) on a batch of real training data of its
first site, with the task's optimizer and batch size. One step = forward, backward, optimizer
step; under DP-SGD also per-sample gradients, clipping, noise and the accountant's step
(Opacus ``PrivacyEngine.make_private``). The variants take turns step by step on the same
batches, so a machine shared with other work slows them alike and the ratio stays meaningful.

Modes: ``hooks`` (what ``grad_sample_mode: auto`` uses), ``ew`` (expanded weights),
``functorch`` (torch.func per-sample gradients) and ``ghost`` (fast gradient clipping: per-
sample gradient NORMS and a second backward pass instead of stored per-sample gradients).
Each mode is also checked for correctness: with zero noise, the clipped and averaged gradient
of one batch must equal the ``hooks`` one (``max_abs_diff_vs_hooks``).
``benchmarks.cost`` reports these ratios against the goal.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import data_dir, limit_threads, machine, markdown_table, write_results
from fl_app.centralized import load_sites
from fl_app.config import compose_config
from strategies.local_dp import prepare_model, quiet_opacus
from tasks import engine, get_task

MODES = ("hooks", "ew", "functorch", "ghost")
# (label, overrides); the task's own model, batch size and optimizer
MODELS = {
    "chest_xray": ("chest X-ray CNN 28x28 (GroupNorm)", "task=chest_xray partition=iid "
                   "partition.num_sites=1"),
    "breast_cancer": ("breast-cancer MLP (30-32-2)", "task=breast_cancer task.model=mlp "
                      "partition.num_sites=1"),
}
Step = Callable[[tuple[torch.Tensor, torch.Tensor]], None]


def task_model(name: str) -> tuple[nn.Module, DataLoader, Any]:
    """The task's model, its first site's training loader and the task config."""
    overrides = MODELS[name][1]
    if name in ("chest_xray",):
        overrides += f" task.data_dir={data_dir(name)}"
    cfg = compose_config(overrides)
    task = get_task(cfg.task.name)
    site = load_sites(cfg)[0]  # prepared as in a federated run (federated statistics too)
    torch.manual_seed(0)
    model = task.build_model(cfg, site.info)
    loader = engine.make_loader(site.train, cfg.task.batch_size, shuffle=True, seed=0)
    return model, loader, cfg.task


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """One non-private step."""
    criterion = nn.CrossEntropyLoss()

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        optimizer.zero_grad()
        criterion(model(batch[0]), batch[1]).backward()
        optimizer.step()
    return step


def private_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                 mode: str, noise_multiplier: float = 1.0
                 ) -> tuple[Step, torch.optim.Optimizer]:
    """One DP-SGD step in ``mode`` (fixed-size batches: the cost is Opacus's, not sampling's)."""
    from opacus import PrivacyEngine

    model = prepare_model(model)
    dummy = TensorDataset(torch.zeros(batch_size, 1), torch.zeros(batch_size))
    with quiet_opacus():
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer,
            data_loader=DataLoader(dummy, batch_size=batch_size),
            noise_multiplier=noise_multiplier, max_grad_norm=1.0, poisson_sampling=False,
            grad_sample_mode=mode, criterion=nn.CrossEntropyLoss())
    private, dp_optimizer = made[0], made[1]
    # ghost: the wrapped criterion runs both backward passes
    criterion = made[2] if len(made) == 4 else nn.CrossEntropyLoss()

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        with quiet_opacus():
            dp_optimizer.zero_grad()
            criterion(private(batch[0]), batch[1]).backward()
            dp_optimizer.step()
    return step, dp_optimizer


def clipped_gradient(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                     mode: str) -> torch.Tensor:
    """The clipped, averaged gradient DP-SGD applies for ``batch`` in ``mode``, noise 0."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step, dp_optimizer = private_step(model, optimizer, len(batch[1]), mode,
                                      noise_multiplier=0.0)
    step(batch)
    return torch.cat([p.grad.detach().flatten() for p in dp_optimizer.params])


def bench(name: str, steps: int, warmup: int, modes: tuple[str, ...] = MODES
          ) -> list[dict[str, Any]]:
    """Non-private and DP-SGD step times (and correctness) for one task's model."""
    model, loader, task_cfg = task_model(name)
    batches = []
    while len(batches) < steps + warmup:  # full batches only: every variant sees the same
        batches += [b for b in loader if len(b[1]) == task_cfg.batch_size]
    batches = batches[:steps + warmup]
    reference = clipped_gradient(model, batches[0], "hooks")
    variants: dict[str, Step] = {}
    plain = copy.deepcopy(model).train()
    variants["non-private"] = plain_step(plain, engine.make_optimizer(plain, task_cfg))
    diffs: dict[str, float | None] = {"non-private": None}
    for mode in modes:
        try:
            diffs[mode] = float((clipped_gradient(model, batches[0], mode) - reference)
                                .abs().max())
            copy_ = copy.deepcopy(model)
            variants[mode] = private_step(copy_, engine.make_optimizer(copy_, task_cfg),
                                          task_cfg.batch_size, mode)[0]
        except Exception as err:  # a mode Opacus cannot run on this model: say so
            diffs[mode] = None
            variants.pop(mode, None)
            print(f"dp_step: {name}: {mode} fails: {type(err).__name__}: {err}")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i, batch in enumerate(batches):
        for variant, step in variants.items():
            start = time.perf_counter()
            step(batch)
            if i >= warmup:
                times[variant].append(time.perf_counter() - start)
    base = times["non-private"]
    rows = []
    for variant in ("non-private", *modes):
        row: dict[str, Any] = {"model": MODELS[name][0], "task": name, "mode": variant,
                               "batch_size": int(task_cfg.batch_size),
                               "max_abs_diff_vs_hooks": diffs.get(variant)}
        if variant in times:
            t = times[variant]
            row |= {"median_step_s": statistics.median(t),
                    "ratio": statistics.median(t) / statistics.median(base),
                    "paired_ratio_median": statistics.median(
                        d / p for d, p in zip(t, base, strict=True)),
                    "steps_timed": len(t), "status": "ok"}
        else:
            row["status"] = "fails"
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`bench` rows."""
    def cell(r: dict[str, Any], key: str, f: str) -> str:
        return format(r[key], f) if r.get(key) is not None else "–"
    return markdown_table(
        ["model", "batch", "mode", "median step (ms)", "x non-private", "paired ratio",
         "max |grad - hooks|"],
        [[r["model"], r["batch_size"], r["mode"],
          f"{1000 * r['median_step_s']:.1f}" if r["status"] == "ok" else r["status"],
          cell(r, "ratio", ".2f"), cell(r, "paired_ratio_median", ".2f"),
          cell(r, "max_abs_diff_vs_hooks", ".1e")] for r in rows])


def run(tiny: bool, full: bool) -> dict[str, Any]:
    """Every model's rows (tiny: the MLP, a few steps)."""
    names = ("breast_cancer",) if tiny else ("chest_xray", "breast_cancer")
    steps, warmup = (3, 1) if tiny else ((30, 3) if full else (10, 2))
    rows = [r for name in names for r in bench(name, steps, warmup)]
    return {"setup": {"models": list(names), "steps": steps, "warmup": warmup},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write ``dp_step.json`` and ``dp_step.md`` in ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the MLP only, 3 steps")
    parser.add_argument("--full", action="store_true", help="30 timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    result = {"machine": machine(), **run(args.tiny, args.full)}
    text = table(result["rows"])
    write_results(args.out, "dp_step", result,
                  "# DP-SGD step / non-private step (python -m benchmarks.dp_step)\n\n" + text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
