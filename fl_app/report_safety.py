"""Run report sections on privacy and safety: the privacy spend (with membership-inference
AUCs), secure aggregation, rejected updates and dropped hospitals, bytes on the wire, external
validation, and the glossary."""

from __future__ import annotations

from typing import Any

from fl_app import report_format as fmt
from fl_app import report_words as words
from fl_app.plots import byte_unit


def privacy(facts: dict[str, Any]) -> str:
    if fmt.centralized(facts):
        return ""
    privacy = facts["summary"].get("privacy")
    mia = _mia(facts["summary"].get("membership_inference"))
    planned = facts["cfg"].get("privacy", {}).get("mechanism", "none")
    if not isinstance(privacy, dict) and planned != "none":
        return (f"## Privacy\n\n{words.privacy_words(facts['cfg'].get('privacy', {}))}\n\n"
                "No privacy spend was recorded: the run stopped before any hospital trained.")
    if not isinstance(privacy, dict) or privacy.get("mechanism", "none") == "none":
        text = ("## Privacy\n\nNo differential privacy in this run: no formal limit on what "
                "the model updates reveal about a patient.")
        if mia:
            text += "\n\n" + fmt.table(["hospital", "membership-inference AUC"],
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
        capped = spend.get("budget_epsilon") is not None
        row = [site, spend.get("epsilon"), spend.get("rounds_trained"),
               words.PRIVACY_STATUS.get(status, str(status)) if capped or status != "active"
               else "trained every round it was asked",
               spend.get("budget_epsilon") if spend.get("budget_epsilon") is not None
               else "no cap"]
        rows.append(row + ([mia.get(site)] if mia else []))
    lines.append(fmt.table(header, rows))
    central = privacy.get("central")
    if central:
        lines += ["", f"Central mechanism: epsilon {fmt.num(central.get('epsilon'))} at delta "
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
                  "every line):", "", f"![epsilon per hospital over rounds]({fmt.EPSILON_PLOT})"]
    return "\n".join(lines)


_MIA = ("Membership-inference AUC (a loss-threshold attack each hospital runs on its own "
        "data): how well an attacker holding the final model tells a "
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


def security(facts: dict[str, Any]) -> str:
    if fmt.centralized(facts):
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
                  fmt.table(["round", "hospital", "what", "why"],
                         [[str(e[0]), str(e[1]), e[2], fmt.cell(e[3])] for e in events])]
    else:
        lines.append("No update was rejected and no hospital failed or dropped out: every "
                     "hospital's update was used in every round.")
    return "\n".join(lines)



def communication(facts: dict[str, Any]) -> str:
    """Bytes each hospital sent and received (metrics.jsonl ``bytes_up`` / ``bytes_down``:
    site -> bytes per round), in total and per hospital and round."""
    history = facts["history"]
    if not any(h.get("bytes_up") is not None or h.get("bytes_down") is not None
               for h in history):
        return ""
    totals = {}
    for key in ("bytes_up", "bytes_down"):
        values = [h.get(key) for h in history if h.get(key) is not None]
        counts = [len(v) if isinstance(v, dict) else 1 for v in values]
        sums = [sum(v.values()) if isinstance(v, dict) else v for v in values]
        totals[key] = (sum(sums), sum(sums) / max(1, sum(counts))) if values else None
    scale, name = byte_unit(max(t[0] for t in totals.values() if t))
    rows = [[label, f"{t[0] / scale:.3f}", f"{t[1] / scale:.3f}"]
            for label, t in (("sent by the hospitals (up)", totals["bytes_up"]),
                             ("sent to the hospitals (down)", totals["bytes_down"])) if t]
    compression = facts["cfg"].get("compression")
    return ("## What the wire carried\n\n"
            + (f"Compression of model updates: `{compression}`.\n\n"
               if compression is not None else "")
            + fmt.table(["direction", f"{name} in total", f"{name} per hospital and round"],
                        rows)
            + f"\n\n![bytes per hospital and round]({fmt.BYTES_PLOT})")


def external(facts: dict[str, Any]) -> str:
    reports = {k: v for k, v in facts["external"].items() if isinstance(v, dict)}
    if not reports:
        return ""
    lines = ["## External validation", "",
             "The final model on further data, e.g. a hospital outside the consortium "
             "(`python -m fl_app.evaluate`), at the run's operating threshold:", ""]
    rows = []
    for name, r in sorted(reports.items()):
        low, high = (r.get("auc_ci95") or [None, None])[:2]
        split = r.get("split")
        rows.append([name + (f" ({split} split)" if split and split != "all" else ""),
                     r.get("num-examples"), r.get("num-positive"), r.get("auc"),
                     f"{fmt.num(low)}-{fmt.num(high)}", r.get("accuracy"), r.get("sensitivity"),
                     r.get("specificity"), r.get("ece")])
    lines.append(fmt.table(["data", "images", "positive", "AUC", "AUC 95% CI", "accuracy",
                         "sensitivity", "specificity", "calibration error (ECE)"], rows))
    lines += ["", "Calibration error: how far the predicted probabilities are from the observed "
              "rates (0 = a predicted 30% means 30% of such patients are positive)."]
    for name, r in sorted(reports.items()):
        if r.get("reliability_png"):
            lines += ["", f"![reliability diagram, {name}]({r['reliability_png']})"]
    return "\n".join(lines)


def glossary(_: dict[str, Any]) -> str:
    return "## What the numbers mean\n\n" + "\n".join(
        f"- **{term}**: {meaning}." for term, meaning in words.GLOSSARY)
