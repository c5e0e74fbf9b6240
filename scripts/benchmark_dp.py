"""Benchmark: DP-SGD step time vs non-private step time for the chest X-ray CNN.

Times one optimizer step (forward, backward, update) of the chest_xray task's default model
(``tasks.image_models.CompactCNN``, GroupNorm, widths 16/32/64) on real chest X-rays, without
privacy and with Opacus DP-SGD (per-sample gradients, clipping, noise, accountant step), on
the same fixed-size batches, and writes ``benchmark_dp.json`` and ``benchmark_dp.md``.

    .venv/bin/python scripts/benchmark_dp.py --out outputs/bench_dp
    .venv/bin/python scripts/benchmark_dp.py --out /tmp/b --sizes 28 --steps 10 --threads 2

Not a test: the numbers depend on the machine (see ``machine`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_app.run_folder import atomic_write_text
from strategies.local_dp import prepare_model, quiet_opacus
from tasks.image_models import CompactCNN

# image size -> file in shared/data/chest_xray (real films, MedMNIST layout)
FILES = {28: "pneumoniamnist.npz", 64: "kermany_cxr_64.npz", 128: "kermany_cxr_128_subset.npz"}
WIDTHS = (16, 32, 64)  # conf/task/chest_xray.yaml cnn_widths


def default_data_root() -> Path:
    """``$FEDCLINIC_DATA_ROOT`` or ``../shared/data`` beside the repository."""
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("FEDCLINIC_DATA_ROOT", repo.parent / "shared" / "data"))


def load_batches(root: Path, size: int, batch: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` batches of real training films of ``size`` px (cycled if needed)."""
    path = root / "chest_xray" / FILES[size]
    if not path.is_file():
        raise SystemExit(f"benchmark data not found: {path} (set --data-root)")
    data = np.load(path)
    images, labels = data["train_images"], data["train_labels"][:, 0]
    out = []
    for i in range(count):
        idx = np.arange(i * batch, (i + 1) * batch) % len(images)
        x = torch.from_numpy(images[idx].astype(np.float32) / 255.0).unsqueeze(1)
        out.append((x, torch.from_numpy(labels[idx].astype(np.int64))))
    return out


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
          device: torch.device) -> float:
    """Seconds for one step: forward, backward, optimizer step (clipping and noise for DP)."""
    x, y = batch[0].to(device), batch[1].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(size: int, batch: int, steps: int, warmup: int, root: Path, device: torch.device,
          modes: list[str]) -> list[dict[str, Any]]:
    """Non-private and DP-SGD step times for one image size.

    The variants take turns step by step on the same batches, so a machine shared with other
    work slows them alike and the ratio stays meaningful.
    """
    from opacus import PrivacyEngine

    batches = load_batches(root, size, batch, steps + warmup)
    dataset = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*batches, strict=True)])
    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    torch.manual_seed(0)
    plain = CompactCNN(1, 2, "group", WIDTHS).to(device).train()
    variants["non-private"] = (plain, torch.optim.Adam(plain.parameters(), lr=1e-3))
    for mode in modes:
        torch.manual_seed(0)
        model = prepare_model(CompactCNN(1, 2, "group", WIDTHS)).to(device)
        with quiet_opacus():
            private, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                data_loader=torch.utils.data.DataLoader(dataset, batch_size=batch),
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                grad_sample_mode=mode)
        variants[f"DP-SGD ({mode})"] = (private, dp_opt)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with quiet_opacus():
        for i, b in enumerate(batches):
            for name, (model, optimizer) in variants.items():
                seconds = _step(model, optimizer, b, device)
                if i >= warmup:
                    times[name].append(seconds)
    base = statistics.median(times["non-private"])
    return [{"image_size": size, "batch_size": batch, "mode": name,
             "median_step_s": statistics.median(t), "ratio": statistics.median(t) / base,
             "paired_ratio_median": statistics.median(
                 d / p for d, p in zip(t, times["non-private"], strict=True)),
             "steps_timed": len(t)} for name, t in times.items()]


def main() -> None:
    """Parse arguments, run the benchmark, write JSON and a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64], choices=sorted(FILES))
    parser.add_argument("--batch-size", type=int, default=64)  # chest_xray.yaml batch_size
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["hooks"], help="Opacus grad_sample_modes")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    rows = []
    for size in args.sizes:
        rows += bench(size, args.batch_size, args.steps, args.warmup, args.data_root, device,
                      args.modes)
    result = {
        "model": f"CompactCNN(widths={list(WIDTHS)}, GroupNorm), Adam, batch {args.batch_size}",
        "device": str(device),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": args.threads, "cpu_count": os.cpu_count(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "benchmark_dp.json", json.dumps(result, indent=2) + "\n")
    lines = [f"DP-SGD vs non-private step time: {result['model']} on {device} "
             f"({args.threads} threads)", "",
             "| image | batch | mode | median step (ms) | ratio vs non-private | median paired "
             "ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['image_size']}x{r['image_size']} | {r['batch_size']} | {r['mode']} | "
              f"{1000 * r['median_step_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['paired_ratio_median']:.2f}x |" for r in rows]
    atomic_write_text(args.out / "benchmark_dp.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
