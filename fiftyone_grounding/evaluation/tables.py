"""The text tables of a grounding evaluation (what the CLI, the demo and ``evaluate_grounding``
print), and the one rule for a number in a table: four decimals, right-aligned, "-" where missing.
"""

from __future__ import annotations

from typing import Optional


def format_metric(value: Optional[float], width: int = 0) -> str:
    """``value`` with four decimals, right-aligned in ``width`` characters; "-" (aligned the same)
    where it is None. ``width`` 0: no padding."""
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"


def format_table(result: dict) -> str:
    """The metric table: one row per split and overall."""
    rows = [(name, m) for name, m in result["splits"].items()] + [("overall", result["overall"])]
    confident = any(m.get("auroc") is not None for _, m in rows)
    width = max([10] + [len(str(name)) for name, _ in rows])  # refcocox's splits: "refcoco+/testA"
    head = f"{'split':<{width}} | {'count':>6} | {'mIoU':>6} | {'Acc@0.5':>7} | {'Acc@0.75':>8}"
    if confident:
        head += f" | {'AUROC':>6} | {'ECE':>6} | {'Acc@50%':>7} | {'Acc@80%':>7}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        line = f"{name:<{width}} | {m['count']:>6} | {m['miou']:>6.4f} | {m['acc50']:>7.4f} | {m['acc75']:>8.4f}"
        if confident:
            line += " | " + " | ".join(format_metric(m.get(k), w) for k, w in (
                ("auroc", 6), ("ece", 6), ("acc_at_50_coverage", 7), ("acc_at_80_coverage", 7)))
        lines.append(line)
    if confident:
        lines.append("(AUROC: the confidence telling IoU >= 0.5 from < 0.5; ECE: its calibration error; "
                     "Acc@50%/80%: Acc@0.5 of the 50%/80% most confident)")
    if result.get("missing_predictions"):
        lines.append(f"({result['missing_predictions']} samples had no prediction and count as IoU 0)")
    apart = {"no_target": "refer to nothing (no_target)", "several_targets": "have several true boxes"}
    invalid = result.get("unscored", 0) - sum(result.get(k, 0) for k in apart)
    if invalid:
        lines.append(f"({invalid} samples have no valid ground-truth box and are not scored)")
    for key, text in apart.items():
        if result.get(key):
            lines.append(f"({result[key]} samples {text}: one-box models are not scored on them)")
    return "\n".join(lines)


_WRITTEN_FROM = {"given": "as given", "record": "the field's record",
                 "assumed": "no record: the lower of the threshold and the lowest stored confidence"}


def format_grec_table(result: dict) -> str:
    """The generalized grounding table: one row per split and overall, then the sweep ("-": a
    threshold the stored boxes cannot answer, with a note saying why)."""
    rows = [(name, m) for name, m in result["splits"].items()] + [("overall", result["overall"])]
    width = max([10] + [len(str(name)) for name, _ in rows])
    head = f"{'split':<{width}} | {'count':>6} | {'no-target':>9} | {'Pr@F1=1':>7} | {'N-acc':>6} | {'T-acc':>6}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<{width}} | {m['count']:>6} | {m['no_target']:>9} | {format_metric(m['pr_f1'], 7)} | "
                     f"{format_metric(m['n_acc'], 6)} | {format_metric(m['t_acc'], 6)}")
    lines.append(f"(boxes kept at confidence >= {result['overall']['score_thresh']:g}, matched at GIoU >= 0.5; "
                 "Pr@F1=1: the share of phrases with every true box found and nothing else)")
    lines.append("sweep of the threshold: " + ", ".join(
        f"{r['score_thresh']:g}: {format_metric(r['pr_f1'])}" for r in result["sweep"]))
    unanswered = [r["score_thresh"] for r in result["sweep"] + [result["overall"]] if not r.get("answered", True)]
    if unanswered:
        source = result.get("written_from_source")
        below = ", ".join(f"{t:g}" for t in sorted(set(unanswered)))
        why = ("a box below it cannot be told from a box never written" if source == "assumed"
               else "the boxes they would keep were never stored")
        lines.append(f"(the boxes {'are taken as' if source == 'assumed' else 'were'} written from confidence "
                     f"{result['written_from']:g} ({_WRITTEN_FROM.get(source, source)}): the thresholds below it "
                     f"({below}) are not scored, since {why}; apply the model with a lower score_thresh to "
                     "score them)")
    return "\n".join(lines)
