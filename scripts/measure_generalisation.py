"""Does per-image intensity standardisation help a chest X-ray model on another source's images?

    python scripts/measure_generalisation.py --data ../shared/data --out /tmp/generalisation

For each ``task.intensity`` (none, normalize, histeq) it trains the centralized chest X-ray
baseline on PneumoniaMNIST (28 px, MedMNIST's processing of the original images) and checks
the final model with ``fl_app.evaluate`` on the internal test split and on the Kermany test
split as processed by another pipeline (224 px JPEG re-encodings, resized by this project to
64 / 128 px, then by the run's preprocessing to 28 px). Caveat (../shared/data README): both
test splits hold the SAME 624 patients' images, so "cross-source" here means another
acquisition/processing pipeline, not another hospital's population; no other chest X-ray
source with labels is available offline. Writes ``generalisation.json`` and
``generalisation.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fl_app.centralized import run_centralized
from fl_app.config import compose_config
from fl_app.evaluate import evaluate_external
from fl_app.run_folder import atomic_write_text

MODES = ("none", "normalize", "histeq")
TARGETS = {
    "pneumoniamnist (internal)": "pneumoniamnist_full_reconstructed.npz",
    "kermany64 (other pipeline)": "kermany_cxr_64.npz",
    "kermany128 (other pipeline)": "kermany_cxr_128_subset.npz",
}


def main(argv: list[str] | None = None) -> int:
    """Train one baseline per intensity mode, evaluate each on every test source."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    chest = (args.data / "chest_xray").resolve()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode in args.modes.split(","):
        cfg = compose_config(
            f"task=chest_xray task.data_dir={chest} task.image_size=28 task.intensity={mode} "
            f"num_rounds={args.rounds} partition.num_sites=3 output_dir={args.out / 'runs'}"
        )
        run = run_centralized(cfg).path
        results[mode] = {}
        for label, file in TARGETS.items():
            report = evaluate_external(run, chest / file, "test", f"{mode}_{Path(file).stem}")
            results[mode][label] = {k: report[k] for k in ("auc", "auc_ci95", "accuracy",
                                                           "sensitivity", "specificity", "ece")}
            print(f"{mode:10s} {label:30s} AUC {report['auc']:.4f}", flush=True)
    atomic_write_text(args.out / "generalisation.json", json.dumps(results, indent=2) + "\n")
    lines = ["| intensity | " + " | ".join(TARGETS) + " |",
             "| --- |" + " --- |" * len(TARGETS)]
    for mode, row in results.items():
        cells = [f"{row[t]['auc']:.3f} ({row[t]['auc_ci95'][0]:.3f}-{row[t]['auc_ci95'][1]:.3f})"
                 for t in TARGETS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    atomic_write_text(args.out / "generalisation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
