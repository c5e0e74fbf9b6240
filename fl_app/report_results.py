"""Run report sections on what was run and what the model reaches: the setup in plain words,
results pooled and per hospital, what to notice, curves over rounds, the operating threshold
and confusion counts, personalised models and contribution scores."""

from __future__ import annotations

import math
from typing import Any

from fl_app import report_format as fmt
from fl_app import report_words as words


def header(facts: dict[str, Any]) -> str:
    summary, cfg = facts["summary"], facts["cfg"]
    status = summary.get("status", "not finished (no summary.json yet)")
    lines = [f"# Run report: {fmt.title(cfg)}", "",
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
    simulated = "" if fmt.natural(str(facts["cfg"].get("task", {}).get("name"))) else \
        "simulated "
    where = ("on all hospitals' training data pooled in one place (centralized baseline)"
             if fmt.centralized(facts) else f"across {len(facts['sites'])} {simulated}hospitals "
             "without moving their data")
    rounds = summary.get("rounds_completed", len(facts["history"]))
    text = (f"**In short.** The model was trained for {rounds} round{'s' * (rounds != 1)} "
            f"{where}. On all hospitals' test {fmt.unit(facts)} together it reaches AUC "
            f"{fmt.num(pooled.get('auc'))} and accuracy {fmt.num(pooled.get('accuracy'))}.")
    worst = (summary.get("worst_site") or {}).get("accuracy")
    if worst:
        n = (summary.get("per_site") or {}).get(worst["site"], {}).get("num-examples")
        text += (f" The hospital it serves worst is {worst['site']} (accuracy "
                 f"{worst['value']:.3f}, {worst['gap_to_mean']:.3f} below the mean over "
                 "hospitals" + (f"; {n} test {fmt.unit(facts)}" if n is not None else "") + ").")
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


def config(facts: dict[str, Any]) -> str:
    cfg, sites = facts["cfg"], facts["sites"]
    task = cfg.get("task", {})
    what, _ = words.task_words(str(task.get("name")))
    dataset = task.get("dataset")
    data = (words.DATASETS.get(str(dataset), f"data set {dataset}") if dataset
            else words.PROTOCOLS.get(str(task.get("protocol")), f"protocol {task.get('protocol')}")
            if task.get("protocol") else None)
    rows = [
        ["What is predicted", what],
        ["Data", f"`{task.get('data_dir')}`" + (f" ({data})" if data else "")],
        ["Hospitals (sites)", (f"{len(sites)}: " if sites else "not known (the run stopped "
                               "before the sites were queried); ") + words.partition_words(
            cfg.get("partition", {}), len(sites), fmt.natural(str(task.get("name"))))],
        ["How models are combined", words.strategy_words(cfg.get("strategy", {}))],
        ["Training", f"{cfg.get('num_rounds')} rounds x {task.get('local_epochs')} local "
         f"epoch(s); model `{task.get('model')}`; seed {cfg.get('seed')}"],
        ["Privacy", words.privacy_words(cfg.get("privacy", {}))],
        ["Secure aggregation", words.secagg_words(cfg.get("secagg", {"name": "none"}))],
    ]
    if cfg.get("fedbn"):
        rows.append(["FedBN", "normalisation layers stay at each hospital (never shared)"])
    if fmt.centralized(facts):
        rows = [r for r in rows if r[0] not in ("Privacy", "Secure aggregation")]
    unit = words.unit(str(task.get("name")))
    sizes = fmt.table(["hospital", f"training {unit}", f"test {unit}"],
                   [[s["name"], s.get("num_train"), s.get("num_test")] for s in sites])
    return ("## What was run\n\n" + fmt.table(["", ""], rows) + ("\n\n" + sizes if sites else "")
            + "\n\nThe full configuration is in `config.yaml`.")


def glance(facts: dict[str, Any]) -> str:
    summary = facts["summary"]
    pooled = summary.get("pooled") or {}
    if not pooled:
        return "## Results\n\nNo round completed: there are no results."
    worst = summary.get("worst_site") or {}
    rows = [["pooled AUC", pooled.get("auc"), f"all hospitals' test {fmt.unit(facts)} together"],
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
            + fmt.table(["measure", "value", "meaning"], rows))


SMALL_TEST_SET = 30  # fewer test examples than this: one example moves accuracy by > 0.03
LOW_RATE = 0.6  # a site's sensitivity or specificity below this is pointed out
NOTABLE_GAP = 0.05  # a worst-site gap above this is pointed out


def notice(facts: dict[str, Any]) -> str:
    """What a reader should not miss, in plain sentences (worst site, weak sensitivity or
    specificity, small test sets, problems during the run)."""
    summary, unit = facts["summary"], fmt.unit(facts)
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


def per_site(facts: dict[str, Any]) -> str:
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
    unit = fmt.unit(facts)
    missing = ("\n\nn/a: the hospital's test set has no " + unit + " of that class (no "
               "specificity without negatives, no sensitivity without positives, no AUC "
               "without both)." if any(None in (m.get("auc"), m.get("sensitivity"),
                                                 m.get("specificity"))
                                         for m in per_site.values()) else "")
    return (f"## Each hospital\n\nThe final model on each hospital's own test {unit}. The "
            "last column is the hospital's accuracy minus the mean over hospitals: a large "
            "negative value means the shared model serves that hospital worse than the "
            "others.\n\n"
            + fmt.table(["hospital", f"test {unit}", "accuracy", "AUC", "sensitivity",
                      "specificity", "vs mean accuracy"], rows)
            + missing + f"\n\n![final model at each hospital]({fmt.SITES_PLOT})")


def curves(facts: dict[str, Any]) -> str:
    if not facts["history"]:
        return ""
    what = ("epoch blocks of training on the pooled data" if fmt.centralized(facts) else "rounds")
    return ("## Over the rounds\n\n"
            f"Accuracy, AUC and loss (lower is better) of the model after each of the {what}, "
            f"at each hospital (thin lines) and pooled over all test {fmt.unit(facts)} (thick "
            "black line). Curves that flatten mean more rounds would add little."
            + _threshold_note(facts) + f"\n\n![metrics over rounds]({fmt.METRICS_PLOT})")


def _threshold_note(facts: dict[str, Any]) -> str:
    """Why the curves' last accuracy differs from the tables' under a chosen threshold."""
    threshold = facts["summary"].get("threshold")
    if threshold is None or abs(float(threshold) - 0.5) < 1e-9:
        return ""
    return (" Accuracy along the curves is at the default threshold 0.5; the tables above "
            f"are at the operating threshold {float(threshold):.3f} chosen after training, "
            "so the final accuracy there differs (AUC and loss do not depend on the "
            "threshold).")


def confusion(facts: dict[str, Any]) -> str:
    summary = facts["summary"]
    per_site, pooled = summary.get("per_site") or {}, summary.get("pooled") or {}
    if "sensitivity" not in pooled:
        return ""
    _, positive = words.task_words(str(facts["cfg"].get("task", {}).get("name")))
    lines = ["## Operating threshold and confusion counts", "",
             words.threshold_words(summary.get("threshold_rule"), summary.get("threshold"),
                                  fmt.unit(facts)), ""]
    rows = [[site, *_counts(m)] for site, m in sorted(per_site.items())]
    rows.append(["**all hospitals**", *_counts(pooled)])
    if all(r[1] == "n/a" for r in rows):
        lines.append("The sites did not report their class counts (a run made before they "
                     "did), so the counts cannot be shown; sensitivity and specificity are in "
                     "the table above.")
        return "\n".join(lines)
    lines += [f"Counts of test {fmt.unit(facts)}; positive = {positive}. Derived from each "
              "hospital's sensitivity, specificity and class counts (nothing per patient is "
              "released).",
              "", fmt.table([
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


def personalized(facts: dict[str, Any]) -> str:
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
            + fmt.table(["hospital", "global accuracy", "personal accuracy", "gain",
                      "global AUC", "personal AUC"], rows)
            + f"\n\nMean accuracy over hospitals: global {fmt.num(mean_g)}, personal "
            f"{fmt.num(mean_p)}.")


def contribution(facts: dict[str, Any]) -> str:
    """summary.json ``contribution``: each hospital's score (with its standard error and
    leave-one-out score where given) and what the scores are measured in."""
    section = facts["summary"].get("contribution")
    if not isinstance(section, dict) or not isinstance(section.get("scores"), dict):
        return ""
    scores = section["scores"]
    errors = section.get("standard_error") if isinstance(section.get("standard_error"),
                                                         dict) else {}
    loo = section.get("leave_one_out") if isinstance(section.get("leave_one_out"), dict) else {}
    header = ["hospital", "score"] + (["± s.e."] if errors else []) + (
        ["leave-one-out"] if loo else [])
    rows = [[site, score] + ([errors.get(site)] if errors else []) + (
        [loo.get(site)] if loo else [])
            for site, score in sorted(scores.items(), key=lambda kv: -_key(kv[1]))]
    utility = section.get("utility", "model quality")
    facts_line = []
    if section.get("utility_full") is not None and section.get("utility_initial") is not None:
        facts_line.append(f"the model trained by all hospitals reaches {utility} "
                          f"{fmt.num(section['utility_full'])} against "
                          f"{fmt.num(section['utility_initial'])} for the initial model")
    if section.get("sum_of_scores") is not None:
        facts_line.append(f"the scores add up to {fmt.num(section['sum_of_scores'])}")
    if section.get("evaluations") is not None:
        facts_line.append(f"{section['evaluations']} combinations of hospitals were evaluated")
    return ("## What each hospital contributes\n\n"
            f"Method: {section.get('method', '?')} (utility: {utility}, measured on the "
            "hospitals' validation data). A hospital's score is how much the model's quality "
            "gains from including its updates; the hospitals evaluate the models of "
            "combinations of hospitals on their own data, so no data leaves them. Positive: "
            "it helps; negative: the model is better without it.\n\n"
            + fmt.table(header, rows)
            + (f"\n\nFor scale: {'; '.join(facts_line)}." if facts_line else ""))


def _key(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else -math.inf
