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


def time_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[tuple[torch.Tensor, ...]], device: torch.device,
               warmup: int) -> list[float]:
    """Seconds per step (forward + backward + optimizer step) after ``warmup`` steps."""
    model.to(device).train()
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench(size: int, batch: int, steps: int, warmup: int, root: Path, device: torch.device,
          modes: list[str]) -> list[dict[str, Any]]:
    """Non-private and DP-SGD step times for one image size."""
    from opacus import PrivacyEngine

    batches = load_batches(root, size, batch, steps + warmup)
    rows = []
    torch.manual_seed(0)
    model = CompactCNN(1, 2, "group", WIDTHS)
    plain = time_steps(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches, device,
                       warmup)
    base = statistics.median(plain)
    rows.append({"image_size": size, "batch_size": batch, "mode": "non-private",
                 "median_step_s": base, "ratio": 1.0, "steps_timed": len(plain)})
    for mode in modes:
        torch.manual_seed(0)
        model = prepare_model(CompactCNN(1, 2, "group", WIDTHS)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*batches, strict=True)]),
            batch_size=batch)
        with quiet_opacus():
            engine = PrivacyEngine(accountant="rdp")
            private, dp_opt, _ = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
            dp = time_steps(private, dp_opt, batches, device, warmup)
        median = statistics.median(dp)
        rows.append({"image_size": size, "batch_size": batch, "mode": f"DP-SGD ({mode})",
                     "median_step_s": median, "ratio": median / base, "steps_timed": len(dp)})
    return rows


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
             "| image | batch | mode | median step (ms) | ratio vs non-private |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['image_size']}x{r['image_size']} | {r['batch_size']} | {r['mode']} | "
              f"{1000 * r['median_step_s']:.1f} | {r['ratio']:.2f}x |" for r in rows]
    atomic_write_text(args.out / "benchmark_dp.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
