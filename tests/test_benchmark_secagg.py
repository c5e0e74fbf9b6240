"""Smoke test of the secure-aggregation benchmark (`--tiny`: 3 hospitals, logistic regression)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.secure_aggregation import main


def test_tiny_benchmark_writes_json_and_markdown(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--tiny"]) == 0
    result = json.loads((tmp_path / "secure_aggregation.json").read_text())
    rows = {r["option"]: r for r in result["results"]}
    assert rows["none"]["status"] == rows["secaggplus"]["status"] == "ok"
    assert rows["none"]["messages"] == 2  # train + evaluate per round
    assert rows["secaggplus"]["messages"] == 5  # + key advertisement, shares, unmasking
    # the masked update travels instead of the model: more bytes, same order of magnitude
    assert rows["none"]["upload_bytes"] < rows["secaggplus"]["upload_bytes"]
    assert rows["secaggplus"]["round_s"] > 0
    assert rows["ckks"]["status"] in ("ok", "not built yet")
    table = (tmp_path / "secure_aggregation.md").read_text()
    assert "| secaggplus | 3 |" in table
