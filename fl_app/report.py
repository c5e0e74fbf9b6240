"""The run report: ``report.md`` and its plots, for a clinical collaborator who will not read
code.

    python -m fl_app.report <run folder>     # (re)build the report of an existing run folder

Every run (federated, centralized) writes it at its end, and ``fl_app.evaluate`` rebuilds it
to add its external validation. It is made only from the files of the run folder
(config.yaml, sites.json, metrics.jsonl, summary.json, privacy_ledger.jsonl, external/*.json),
so it can be rebuilt at any time, and holds nothing a site did not already release: metrics,
class counts and privacy spend, never anything per patient. Optional summary.json sections
(``contribution``, ``personalized``, ``membership_inference``) and metrics.jsonl
``bytes_up`` / ``bytes_down`` are shown when present.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from omegaconf import OmegaConf

from fl_app import report_words as words
from fl_app.plots import plot_bytes, plot_epsilon, plot_rounds, plot_sites
from fl_app.run_folder import RunFolder
from tasks import get_task

REPORT_FILE = "report.md"
METRICS_PLOT = "plots/metrics.png"
SITES_PLOT = "plots/sites.png"
EPSILON_PLOT = "plots/privacy_epsilon.png"
BYTES_PLOT = "plots/communication.png"


def write_report(run_dir: Path | str) -> Path:
    """(Re)build ``report.md`` and the plots it shows from the files of ``run_dir``."""
    run = RunFolder.open(Path(run_dir))
    facts = _load(run.path)
    _plots(run.path, facts)
    parts = [section(facts) for section in SECTIONS]
    return run.write_text(REPORT_FILE, "\n\n".join(p.strip() for p in parts if p) + "\n")


def report_quietly(run_dir: Path | str) -> Path | None:
    """``write_report``, logging instead of raising: a report problem never fails a run."""
    try:
        return write_report(run_dir)
    except Exception as err:  # the run's own results are already written
        log(WARNING, "fedclinic: could not write %s in %s: %s: %s (rebuild it with "
            "python -m fl_app.report %s)", REPORT_FILE, run_dir, type(err).__name__, err,
            run_dir)
        return None


# ---------------------------------------------------------------------------- loading


def _load(path: Path) -> dict[str, Any]:
    """Everything the report reads, as plain Python values (missing files: empty)."""
    cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
    return {
        "path": path,
        "cfg": cfg,
        "summary": _json(path / "summary.json") or {},
        "sites": (_json(path / "sites.json") or {}).get("sites", []),
        "history": _jsonl(path / "metrics.jsonl"),
        "ledger": _jsonl(path / "privacy_ledger.jsonl"),
        "external": {p.stem: _json(p) for p in sorted((path / "external").glob("*.json"))},
    }


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plots(path: Path, facts: dict[str, Any]) -> None:
    """Draw the plots the sections reference (each only when its data exists)."""
    cfg, summary, history = facts["cfg"], facts["summary"], facts["history"]
    title = _title(cfg)
    if history:  # results.py drew it at the end of the run; redrawn as this report shows it
        plot_rounds(history, path / METRICS_PLOT, title)
    if summary.get("per_site"):
        plot_sites(summary["per_site"], path / SITES_PLOT,
                   f"{title}: final model at each hospital (test {_unit(facts)})")
    if facts["ledger"]:
        budget = (cfg.get("privacy", {}).get("budget") or {}).get("epsilon")
        plot_epsilon(facts["ledger"], path / EPSILON_PLOT,
                     "Privacy spent per hospital (x: round not trained)", budget)
    if any(h.get("bytes_up") is not None or h.get("bytes_down") is not None for h in history):
        plot_bytes(history, path / BYTES_PLOT, "Bytes on the wire per hospital and round")


# ---------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 3) -> str:
    """A metric for a table: n/a for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _title(cfg: dict[str, Any]) -> str:
    task = str(cfg.get("task", {}).get("name", "?")).replace("_", " ")
    strategy = str(cfg.get("strategy", {}).get("name", "?"))
    privacy = str(cfg.get("privacy", {}).get("name", "none"))
    return f"{task} / {strategy}" + (f" / {privacy}" if privacy != "none" else "")


def _natural(task: str) -> bool:
    """Whether the task's sites are real hospitals (not a split of one data set)."""
    try:
        return bool(get_task(task).natural_sites)
    except (KeyError, ValueError, ImportError):
        return False


def _unit(facts: dict[str, Any]) -> str:
    return words.unit(str(facts["cfg"].get("task", {}).get("name")))


def _centralized(facts: dict[str, Any]) -> bool:
    return facts["cfg"].get("strategy", {}).get("name") == "centralized"


# ---------------------------------------------------------------------------- sections


def _header(facts: dict[str, Any]) -> str:
    summary, cfg = facts["summary"], facts["cfg"]
    status = summary.get("status", "not finished (no summary.json yet)")
    lines = [f"# Run report: {_title(cfg)}", "",
             f"Run folder `{facts['path'].name}`. Status: **{status}**"
             + (f": {summary['reason']}" if summary.get("reason") else "") + ".",
             f"Rounds completed: {summary.get('rounds_completed', len(facts['history']))} of "
             f"{cfg.get('num_rounds')}."]
    if summary.get("status") == "failed":
        lines.append("The results below are those of the rounds that completed.")
    brief = _in_short(facts)
    return "\n".join(lines + (["", brief] if brief else []))


def _in_short(facts: dict[str, Any]) -> str:
    """Two or three sentences: where it was trained, what the model reaches, who is served
    worst, what privacy it had."""
    summary = facts["summary"]
    pooled = summary.get("pooled") or {}
    if not pooled:
        return ""
    simulated = "" if _natural(str(facts["cfg"].get("task", {}).get("name"))) else \
        "simulated "
    where = ("on all hospitals' training data pooled in one place (centralized baseline)"
             if _centralized(facts) else f"across {len(facts['sites'])} {simulated}hospitals "
             "without moving their data")
    rounds = summary.get("rounds_completed", len(facts["history"]))
    text = (f"**In short.** The model was trained for {rounds} round{'s' * (rounds != 1)} "
            f"{where}. On all "
            f"hospitals' test {_unit(facts)} together it reaches AUC {_num(pooled.get('auc'))}"
            f" and accuracy {_num(pooled.get('accuracy'))}.")
    worst = (summary.get("worst_site") or {}).get("accuracy")
    if worst:
        n = (summary.get("per_site") or {}).get(worst["site"], {}).get("num-examples")
        text += (f" The hospital it serves worst is {worst['site']} (accuracy "
                 f"{worst['value']:.3f}, {worst['gap_to_mean']:.3f} below the mean over "
                 "hospitals" + (f"; {n} test {_unit(facts)}" if n is not None else "") + ").")
    privacy = summary.get("privacy")
    if isinstance(privacy, dict) and privacy.get("mechanism", "none") != "none":
        spent = [s.get("epsilon") for s in (privacy.get("per_site") or {}).values()
                 if s.get("epsilon") is not None]
        if spent:
            kind = "local" if privacy["mechanism"] == "local_dp" else "central"
            text += (f" With {kind} differential privacy, no hospital spent more than epsilon "
                     f"{max(spent):.2f} (delta {privacy.get('delta')}): "
                     f"{words.epsilon_strength(max(spent))} protection.")
    return text


def _config(facts: dict[str, Any]) -> str:
    cfg, sites = facts["cfg"], facts["sites"]
    task = cfg.get("task", {})
    what, _ = words.task_words(str(task.get("name")))
    dataset = task.get("dataset")
    data = (words.DATASETS.get(str(dataset), f"data set {dataset}") if dataset
            else f"protocol {task.get('protocol')}" if task.get("protocol") else None)
    rows = [
        ["What is predicted", what],
        ["Data", f"`{task.get('data_dir')}`" + (f" ({data})" if data else "")],
        ["Hospitals (sites)", f"{len(sites)}: " + words.partition_words(
            cfg.get("partition", {}), len(sites), _natural(str(task.get("name"))))],
        ["How models are combined", words.strategy_words(cfg.get("strategy", {}))],
        ["Training", f"{cfg.get('num_rounds')} rounds x {task.get('local_epochs')} local "
         f"epoch(s); model `{task.get('model')}`; seed {cfg.get('seed')}"],
        ["Privacy", words.privacy_words(cfg.get("privacy", {}))],
        ["Secure aggregation", words.secagg_words(cfg.get("secagg", {"name": "none"}))],
    ]
    if cfg.get("fedbn"):
        rows.append(["FedBN", "normalisation layers stay at each hospital (never shared)"])
    if _centralized(facts):
        rows = [r for r in rows if r[0] not in ("Privacy", "Secure aggregation")]
    unit = words.unit(str(task.get("name")))
    sizes = _table(["hospital", f"training {unit}", f"test {unit}"],
                   [[s["name"], s.get("num_train"), s.get("num_test")] for s in sites])
    return ("## What was run\n\n" + _table(["", ""], rows) + "\n\n" + sizes
            + "\n\nThe full configuration is in `config.yaml`.")


def _glance(facts: dict[str, Any]) -> str:
    summary = facts["summary"]
    pooled = summary.get("pooled") or {}
    if not pooled:
        return "## Results\n\nNo round completed: there are no results."
    worst = summary.get("worst_site") or {}
    rows = [["pooled AUC", pooled.get("auc"), f"all hospitals' test {_unit(facts)} together"],
            ["pooled accuracy", pooled.get("accuracy"), "at the operating threshold"],
            ["pooled sensitivity", pooled.get("sensitivity"), "ill patients flagged"],
            ["pooled specificity", pooled.get("specificity"), "healthy patients cleared"],
            ["mean accuracy over hospitals", summary.get("mean_site_accuracy"),
             "every hospital counts the same"],
            ["mean AUC over hospitals", summary.get("mean_site_auc"),
             f"{summary.get('one_class_sites', 0)} hospital(s) left out: their test patients "
             "are all of one class, so they have no AUC"
             if summary.get("one_class_sites") else "every hospital counts the same"]]
    for metric, label in (("accuracy", "accuracy"), ("auc", "AUC")):
        if metric in worst:
            w = worst[metric]
            rows.append([f"worst hospital ({label})", w["value"],
                         f"{w['site']}, {w['gap_to_mean']:.3f} below the mean over hospitals"])
    rows = [r for r in rows if r[1] is not None]
    return ("## Results of the final model\n\n"
            + _table(["measure", "value", "meaning"], rows))


SMALL_TEST_SET = 30  # fewer test examples than this: one example moves accuracy by > 0.03
LOW_RATE = 0.6  # a site's sensitivity or specificity below this is pointed out
NOTABLE_GAP = 0.05  # a worst-site gap above this is pointed out


def _notice(facts: dict[str, Any]) -> str:
    """What a reader should not miss, in plain sentences (worst site, weak sensitivity or
    specificity, small test sets, problems during the run)."""
    summary, unit = facts["summary"], _unit(facts)
    per_site = summary.get("per_site") or {}
    notes = []
    worst = (summary.get("worst_site") or {}).get("accuracy")
    if worst and worst["gap_to_mean"] > NOTABLE_GAP:
        notes.append(f"The shared model serves **{worst['site']}** worst: accuracy "
                     f"{worst['value']:.3f}, {worst['gap_to_mean']:.3f} below the mean over "
                     "hospitals.")
    for site, m in sorted(per_site.items()):
        for key, who, what in (("sensitivity", "with the condition", "missed"),
                               ("specificity", "without the condition", "flagged")):
            value = m.get(key)
            if value is not None and value < LOW_RATE:
                total = m.get("num-positive" if key == "sensitivity" else "num-negative")
                share = (f"{total - round(value * total)} of its {total}" if total else
                         f"{1 - value:.0%} of its")
                notes.append(f"At **{site}** the {key} is {value:.2f}: {share} test {unit} "
                             f"{who} are {what}.")
        n = m.get("num-examples")
        if n is not None and n < SMALL_TEST_SET:
            notes.append(f"**{site}** has only {n} test {unit}: one of them moves its accuracy "
                         f"by {1 / n:.2f}, so its numbers are uncertain.")
    if summary.get("one_class_sites"):
        notes.append(f"{summary['one_class_sites']} hospital(s) have test {unit} of one class "
                     "only: no AUC there, and either sensitivity or specificity is unknown.")
    problems = sum(len(h.get("rejected") or {}) + len(h.get("failures") or {})
                   for h in facts["history"])
    if problems:
        notes.append(f"{problems} update(s) were rejected or site(s) failed during the run "
                     "(see below).")
    stopped = (summary.get("privacy") or {}).get("stopped_early") \
        if isinstance(summary.get("privacy"), dict) else None
    if stopped:
        notes.append(f"Training stopped early for privacy: {stopped}.")
    if not notes:
        return ""
    return "## Worth noticing\n\n" + "\n".join(f"- {n}" for n in notes)


def _per_site(facts: dict[str, Any]) -> str:
    summary = facts["summary"]
    per_site = summary.get("per_site") or {}
    if not per_site:
        return ""
    mean = summary.get("mean_site_accuracy")
    rows = []
    for site, m in sorted(per_site.items()):
        gap = None if mean is None or m.get("accuracy") is None else m["accuracy"] - mean
        rows.append([site, m.get("num-examples"), m.get("accuracy"), m.get("auc"),
                     m.get("sensitivity"), m.get("specificity"),
                     "n/a" if gap is None else f"{gap:+.3f}"])
    unit = _unit(facts)
    missing = ("\n\nn/a: the hospital's test set has no " + unit + " of that class (no "
               "specificity without negatives, no sensitivity without positives, no AUC "
               "without both)." if any(None in (m.get("auc"), m.get("sensitivity"),
                                                 m.get("specificity"))
                                         for m in per_site.values()) else "")
    return (f"## Each hospital\n\nThe final model on each hospital's own test {unit}. The "
            "last column is the hospital's accuracy minus the mean over hospitals: a large "
            "negative value means the shared model serves that hospital worse than the "
            "others.\n\n"
            + _table(["hospital", f"test {unit}", "accuracy", "AUC", "sensitivity",
                      "specificity", "vs mean accuracy"], rows)
            + missing + f"\n\n![final model at each hospital]({SITES_PLOT})")


def _curves(facts: dict[str, Any]) -> str:
    if not facts["history"]:
        return ""
    what = ("epoch blocks of training on the pooled data" if _centralized(facts) else "rounds")
    return ("## Over the rounds\n\n"
            f"Accuracy, AUC and loss (lower is better) of the model after each of the {what}, "
            f"at each hospital (thin lines) and pooled over all test {_unit(facts)} (thick "
            "black line). Curves that flatten mean more rounds would add little."
            + _threshold_note(facts) + f"\n\n![metrics over rounds]({METRICS_PLOT})")


def _threshold_note(facts: dict[str, Any]) -> str:
    """Why the curves' last accuracy differs from the tables' under a chosen threshold."""
    threshold = facts["summary"].get("threshold")
    if threshold is None or abs(float(threshold) - 0.5) < 1e-9:
        return ""
    return (" Accuracy along the curves is at the default threshold 0.5; the tables above "
            f"are at the operating threshold {float(threshold):.3f} chosen after training, "
            "so the final accuracy there differs (AUC and loss do not depend on the "
            "threshold).")


def _confusion(facts: dict[str, Any]) -> str:
    summary = facts["summary"]
    per_site, pooled = summary.get("per_site") or {}, summary.get("pooled") or {}
    if "sensitivity" not in pooled:
        return ""
    _, positive = words.task_words(str(facts["cfg"].get("task", {}).get("name")))
    lines = ["## Operating threshold and confusion counts", "",
             words.threshold_words(summary.get("threshold_rule"), summary.get("threshold"),
                                  _unit(facts)), ""]
    rows = [[site, *_counts(m)] for site, m in sorted(per_site.items())]
    rows.append(["**all hospitals**", *_counts(pooled)])
    if all(r[1] == "n/a" for r in rows):
        lines.append("The sites did not report their class counts (a run made before they "
                     "did), so the counts cannot be shown; sensitivity and specificity are in "
                     "the table above.")
        return "\n".join(lines)
    lines += [f"Counts of test {_unit(facts)}; positive = {positive}. Derived from each hospital's "
              "sensitivity, specificity and class counts (nothing per patient is released).",
              "", _table([
                  "hospital", f"{positive}: flagged (TP)", f"{positive}: missed (FN)",
                  f"no {positive}: cleared (TN)", f"no {positive}: flagged (FP)"], rows)]
    return "\n".join(lines)


def _counts(m: dict[str, Any]) -> list[Any]:
    """TP, FN, TN, FP from sensitivity/specificity and the class counts ("n/a" if unknown)."""
    pos, neg = m.get("num-positive"), m.get("num-negative")
    if pos is None or neg is None:
        return ["n/a"] * 4
    sens, spec = m.get("sensitivity"), m.get("specificity")
    tp = round(sens * pos) if pos and sens is not None else 0
    tn = round(spec * neg) if neg and spec is not None else 0
    return [tp, pos - tp, tn, neg - tn]


def _personalized(facts: dict[str, Any]) -> str:
    personal = facts["summary"].get("personalized")
    if not isinstance(personal, dict) or not personal.get("per_site"):
        return ""
    shared = facts["summary"].get("per_site") or {}
    rows = []
    for site, m in sorted(personal["per_site"].items()):
        g = shared.get(site, {})
        gain = (None if g.get("accuracy") is None or m.get("accuracy") is None
                else m["accuracy"] - g["accuracy"])
        rows.append([site, g.get("accuracy"), m.get("accuracy"),
                     "n/a" if gain is None else f"{gain:+.3f}", g.get("auc"), m.get("auc")])
    method = personal.get("method") or facts["cfg"].get("personalize", {})
    if isinstance(method, dict):
        method = method.get("name", "")
    mean_g, mean_p = facts["summary"].get("mean_site_accuracy"), personal.get(
        "mean_site_accuracy")
    return ("## Personalised models\n\n"
            f"After federated training each hospital tuned its own copy of the model "
            f"({method}). Shared (global) model vs the hospital's personal model, on the same "
            "test patients; the gain is what personalisation buys that hospital.\n\n"
            + _table(["hospital", "global accuracy", "personal accuracy", "gain",
                      "global AUC", "personal AUC"], rows)
            + f"\n\nMean accuracy over hospitals: global {_num(mean_g)}, personal "
            f"{_num(mean_p)}.")


def _contribution(facts: dict[str, Any]) -> str:
    section = facts["summary"].get("contribution")
    if not isinstance(section, dict) or not isinstance(section.get("scores"), dict):
        return ""
    scores = section["scores"]
    rows = [[site, score] for site, score in sorted(scores.items(), key=lambda kv: -_key(kv[1]))]
    extra = {k: v for k, v in section.items() if k not in ("scores", "method")
             and isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    notes = "; ".join(f"{k.replace('_', ' ')}: {_num(v)}" for k, v in sorted(extra.items()))
    return ("## What each hospital contributes\n\n"
            f"Method: {section.get('method', '?')}. A hospital's score is how much the final "
            "model's quality gains from including its data and updates (computed by the "
            "hospitals evaluating models on their own validation patients). Positive: it "
            "helps; negative: the model is better without it.\n\n"
            + _table(["hospital", "score"], rows) + (f"\n\n{notes}." if notes else ""))


def _key(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else -math.inf


def _privacy(facts: dict[str, Any]) -> str:
    if _centralized(facts):
        return ""
    privacy = facts["summary"].get("privacy")
    mia = _mia(facts["summary"].get("membership_inference"))
    if not isinstance(privacy, dict) or privacy.get("mechanism", "none") == "none":
        text = ("## Privacy\n\nNo differential privacy in this run: no formal limit on what "
                "the model updates reveal about a patient.")
        if mia:
            text += "\n\n" + _table(["hospital", "membership-inference AUC"],
                                    [[s, a] for s, a in sorted(mia.items())]) + "\n\n" + _MIA
        return text
    lines = ["## Privacy", "", words.privacy_words(facts["cfg"].get("privacy", {})), "",
             f"Final spend per hospital (accountant {privacy.get('accountant')}, delta "
             f"{privacy.get('delta')}); each hospital's epsilon covers every round it trained:",
             ""]
    header = ["hospital", "epsilon", "rounds trained", "status", "budget"]
    if mia:
        header.append("membership-inference AUC")
    rows = []
    for site, spend in sorted((privacy.get("per_site") or {}).items()):
        status = spend.get("status")
        row = [site, spend.get("epsilon"), spend.get("rounds_trained"),
               words.PRIVACY_STATUS.get(status, str(status)),
               spend.get("budget_epsilon") if spend.get("budget_epsilon") is not None
               else "no cap"]
        rows.append(row + ([mia.get(site)] if mia else []))
    lines.append(_table(header, rows))
    central = privacy.get("central")
    if central:
        lines += ["", f"Central mechanism: epsilon {_num(central.get('epsilon'))} at delta "
                  f"{central.get('delta')} after {central.get('releases')} noisy release(s) "
                  f"(noise multiplier {central.get('noise_multiplier')})."]
    if privacy.get("stopped_early"):
        lines += ["", f"The run stopped early: {privacy['stopped_early']}."]
    lines += ["", "Not covered by epsilon: the test metrics and training loss each hospital "
              "reports, and facts about a hospital as a whole (its size, its class counts, "
              "that it takes part); see docs/privacy.md."]
    if mia:
        lines += ["", _MIA]
    if facts["ledger"]:
        lines += ["", "Epsilon spent so far, after every round (`privacy_ledger.jsonl` has "
                  "every line):", "", f"![epsilon per hospital over rounds]({EPSILON_PLOT})"]
    return "\n".join(lines)


_MIA = ("Membership-inference AUC: how well an attacker holding the final model tells a "
        "hospital's training patients from patients it never saw (0.5 = no better than a coin; "
        "1 = always). It is the measured leakage, beside the formal guarantee (epsilon).")


def _mia(section: Any) -> dict[str, Any]:
    """site -> attack AUC from summary.json ``membership_inference`` (flat or under
    ``per_site``, a number or a dict with ``auc``)."""
    if not isinstance(section, dict):
        return {}
    flat = section.get("per_site", section)
    out = {}
    for site, value in flat.items() if isinstance(flat, dict) else []:
        if isinstance(value, dict):
            value = value.get("auc", value.get("attack_auc"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[site] = value
    return out


def _security(facts: dict[str, Any]) -> str:
    if _centralized(facts):
        return ""
    summary, history = facts["summary"], facts["history"]
    secagg = dict(facts["cfg"].get("secagg") or {})
    secagg["name"] = summary.get("secure_aggregation") or secagg.get("name", "none")
    lines = ["## Secure aggregation, rejected updates, dropped hospitals", "",
             f"Secure aggregation: {words.secagg_words(secagg)}", ""]
    events = []
    for h in history:
        for site, why in (h.get("rejected") or {}).items():
            events.append([h["round"], site, "update rejected", why])
        for site, why in (h.get("failures") or {}).items():
            events.append([h["round"], site, "failed", why])
        for site in h.get("missing_sites") or []:
            events.append([h["round"], site, "no evaluation", "did not report test metrics"])
        if h.get("skipped"):
            events.append([h["round"], "all", "round skipped", h["skipped"]])
    for f in summary.get("site_failures") or []:
        if isinstance(f, dict) and not any(e[0] == f.get("round") and e[1] == f.get("site")
                                           for e in events):
            events.append([f.get("round"), f.get("site"), f"failed ({f.get('stage')})",
                           f.get("reason")])
    for r in summary.get("refused_nodes") or []:
        events.append(["start", r.get("claimed_site"), "refused", r.get("reason")])
    if events:
        lines += ["Every update the server refused to use, every hospital that failed or "
                  "dropped out, and every round without an aggregate:", "",
                  _table(["round", "hospital", "what", "why"],
                         [[str(e[0]), str(e[1]), e[2], _cell(e[3])] for e in events])]
    else:
        lines.append("No update was rejected and no hospital failed or dropped out: every "
                     "hospital's update was used in every round.")
    return "\n".join(lines)


def _cell(text: Any) -> str:
    """One table cell: no line breaks or pipes, at most 200 characters."""
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= 200 else flat[:197] + "..."


def _communication(facts: dict[str, Any]) -> str:
    history = facts["history"]
    if not any(h.get("bytes_up") is not None or h.get("bytes_down") is not None
               for h in history):
        return ""
    totals = {}
    for key in ("bytes_up", "bytes_down"):
        values = [h.get(key) for h in history if h.get(key) is not None]
        per_round = [sum(v.values()) if isinstance(v, dict) else v for v in values]
        totals[key] = (sum(per_round), sum(per_round) / len(per_round)) if per_round else None
    rows = [[label, f"{t[0] / 1e6:.3f}", f"{t[1] / 1e6:.3f}"]
            for label, t in (("sent by the hospitals (up)", totals["bytes_up"]),
                             ("sent to the hospitals (down)", totals["bytes_down"])) if t]
    compression = facts["cfg"].get("compression")
    return ("## What the wire carried\n\n"
            + (f"Compression: `{compression}`.\n\n" if compression is not None else "")
            + _table(["direction", "MB in total", "MB per round (all hospitals)"], rows)
            + f"\n\n![bytes per hospital and round]({BYTES_PLOT})")


def _external(facts: dict[str, Any]) -> str:
    reports = {k: v for k, v in facts["external"].items() if isinstance(v, dict)}
    if not reports:
        return ""
    lines = ["## External validation", "",
             "The final model on data from outside the consortium (`python -m fl_app.evaluate`)"
             ", at the run's operating threshold:", ""]
    rows = []
    for name, r in sorted(reports.items()):
        low, high = (r.get("auc_ci95") or [None, None])[:2]
        rows.append([name, r.get("num-examples"), r.get("num-positive"), r.get("auc"),
                     f"{_num(low)}-{_num(high)}", r.get("accuracy"), r.get("sensitivity"),
                     r.get("specificity"), r.get("ece")])
    lines.append(_table(["data", "images", "positive", "AUC", "AUC 95% CI", "accuracy",
                         "sensitivity", "specificity", "calibration error (ECE)"], rows))
    lines += ["", "Calibration error: how far the predicted probabilities are from the observed "
              "rates (0 = a predicted 30% means 30% of such patients are positive)."]
    for name, r in sorted(reports.items()):
        if r.get("reliability_png"):
            lines += ["", f"![reliability diagram, {name}]({r['reliability_png']})"]
    return "\n".join(lines)


def _glossary(_: dict[str, Any]) -> str:
    return "## What the numbers mean\n\n" + "\n".join(
        f"- **{term}**: {meaning}." for term, meaning in words.GLOSSARY)


SECTIONS = (_header, _config, _glance, _notice, _per_site, _confusion, _curves, _personalized,
            _contribution, _privacy, _security, _communication, _external, _glossary)


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.report RUN``: rebuild the report; 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fl_app.report",
                                     description="(Re)build report.md of a run folder.")
    parser.add_argument("run", type=Path, help="run folder (holds config.yaml)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run)
    except (FileNotFoundError, ValueError) as err:  # not a run folder / unreadable JSON
        print(f"fedclinic report: error: {err}", file=sys.stderr)
        return 2
    print(f"fedclinic: report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
