"""The FiftyOne evaluation backend of grounding: a run the App's Model Evaluation panel shows.

- :func:`evaluate_in_fiftyone`: ``scoring.py``'s scores as a FiftyOne evaluation run
  (:class:`GroundingEvaluationConfig`, method ``"grounding"``), written in bulk: TP/FP/FN on every
  sample and box as FiftyOne's detection evaluation writes them, the sample IoU field, a mAP over
  IoU 0.50:0.95 ranked by the real confidence (:class:`GroundingResults`), the grounding metrics
  as custom metrics, and the split and category fields as the Model Evaluation panel's scenarios.
  ``dataset.delete_evaluation`` / ``rename_evaluation`` remove or rename every field it wrote.
  ``dataset.evaluate_detections(pred, gt, method=GroundingEvaluationConfig)`` runs the same
  method through FiftyOne's own per-sample loop (slower; the same result).
- :func:`metric_value`: the grounding metrics of a detection run's results, for this plugin's
  ``EvaluationMetric`` operators.

FiftyOne stores the class paths of a run's config and results in the dataset; runs stored by
the released 0.1.0 name ``fiftyone_grounding.evaluate``, which ``fiftyone_grounding/__init__.py``
maps to this module.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np

import fiftyone.utils.eval.detection as foud

from ..data.fields import NO_TARGET_FIELD
from ..data.labels import valid_detection_xyxy
from ..fiftyone_api import dataset_id, root_dataset, stream_by_filepath
from ..models.boxes import box_iou
from ..runs import checkpoint_of, record_evaluation
from .metrics import GREC_METRICS, MAP_THRESHOLDS, METRICS, average_precision
from .scoring import (SampleScores, evaluate_grec, has_generalized_phrases, metrics_of, score_samples,
                      write_sample_values)

METHOD = "grounding"
MISSING = "(none)"  # FiftyOne's label for "no match" in the results' ytrue / ypred
SCENARIO_FIELDS = ("split", "category")


class GroundingEvaluationConfig(foud.DetectionEvaluationConfig):
    """A grounding evaluation: every sample's first predicted box against its first valid true
    box, a true positive at IoU >= ``iou`` (0.5)."""

    def __init__(self, pred_field, gt_field, iou=0.5, classwise=False, custom_metrics=None, **kwargs):
        super().__init__(pred_field, gt_field, iou=iou, classwise=classwise, custom_metrics=custom_metrics, **kwargs)

    @property
    def method(self):
        return METHOD


class GroundingEvaluation(foud.DetectionEvaluation):
    """The grounding evaluation method (see the module's docstring)."""

    def evaluate(self, doc, eval_key=None):
        """FiftyOne's per-sample hook (for ``evaluate_detections(method=...)``): the same matches
        and box attributes as the bulk path, for one sample."""
        gt_label, pred_label = doc[self.gt_field], doc[self.pred_field]
        gts = gt_label.detections if gt_label is not None else []
        if len(gts) > 1 or (doc.has_field(NO_TARGET_FIELD) and doc[NO_TARGET_FIELD]):
            return []  # one-box scoring does not apply (as in score_samples)
        gt, gt_det = None, None
        for det in gts:
            xyxy = valid_detection_xyxy(det.bounding_box)
            if xyxy is not None:
                gt, gt_det = xyxy, det
                break
        if gt is None:
            return []
        pred_det = pred_label.detections[0] if pred_label is not None and pred_label.detections else None
        iou = 0.0
        if pred_det is not None:
            box = valid_detection_xyxy(pred_det.bounding_box)
            if box is not None:
                iou = float(box_iou(np.asarray(box, dtype=np.float64), np.asarray(gt, dtype=np.float64), eps=0.0))
        status = _status(iou, pred_det is not None, self.config.iou)
        if eval_key is not None:
            doc[iou_field_of(eval_key)] = iou
            for det, value, other, match_iou in _attributes(status, gt_det, pred_det, iou):
                det[eval_key] = value
                det[f"{eval_key}_id"] = other
                det[f"{eval_key}_iou"] = match_iou
        return _matches(status, gt_det.label, gt_det.id, pred_det.label if pred_det else None,
                        pred_det.id if pred_det else None, iou, pred_det.confidence if pred_det else None)

    def register_samples(self, samples, eval_key, dynamic=True):
        super().register_samples(samples, eval_key, dynamic=dynamic)
        if eval_key is not None and not samples._dataset.has_field(iou_field_of(eval_key)):
            import fiftyone as fo

            samples._dataset.add_sample_field(iou_field_of(eval_key), fo.FloatField)

    def generate_results(self, samples, matches, eval_key=None, classes=None, missing=None, progress=None):
        return GroundingResults(samples, self.config, eval_key, matches, classes=classes, missing=missing,
                                backend=self)

    def get_fields(self, samples, eval_key, include_custom_metrics=True):
        return super().get_fields(samples, eval_key, include_custom_metrics) + [iou_field_of(eval_key)]

    def cleanup(self, samples, eval_key):
        super().cleanup(samples, eval_key)
        samples._dataset.delete_sample_fields([iou_field_of(eval_key)], error_level=1)

    # This plugin's metrics write no fields: nothing to find, rename or clean up (and no
    # operator lookup, which fails where the plugin is not installed). FiftyOne's own handling
    # runs for the other metrics of the run.
    def get_custom_metric_fields(self, samples, eval_key, metric_uris=None):
        with self._other_metrics(metric_uris):
            return super().get_custom_metric_fields(samples, eval_key)

    def rename_custom_metrics(self, samples, eval_key, new_eval_key, metric_uris=None):
        with self._other_metrics(metric_uris):
            super().rename_custom_metrics(samples, eval_key, new_eval_key)

    def cleanup_custom_metrics(self, samples, eval_key, metric_uris=None):
        with self._other_metrics(metric_uris):
            super().cleanup_custom_metrics(samples, eval_key)

    def compute_custom_metrics(self, samples, eval_key, results, metric_uris=None, scores=None):
        """This plugin's metrics (``metric_uri``) are computed here, from the scores (so they are
        there without the plugin installed); the others through FiftyOne's operators."""
        ours = [uri for uri in self._get_custom_metrics(metric_uris) if uri in METRIC_URIS]
        if ours:
            scores = scores if scores is not None else score_samples(samples, self.config.pred_field,
                                                                      self.config.gt_field)
            values = metrics_of(scores, samples, None)["overall"]
            results.custom_metrics = dict(results.custom_metrics or {})
            for key, label, lower_is_better in METRICS:
                uri = metric_uri(key)
                if uri in ours and values.get(key) is not None:
                    results.custom_metrics[uri] = {"key": key, "value": values[key], "label": label,
                                                   "lower_is_better": lower_is_better}
        with self._other_metrics(metric_uris):
            super().compute_custom_metrics(samples, eval_key, results)

    @contextlib.contextmanager
    def _other_metrics(self, metric_uris=None):
        """The run's custom metrics, less this plugin's, while FiftyOne handles them."""
        saved = self.config.custom_metrics
        kwargs = saved if isinstance(saved, dict) else {}
        others = [uri for uri in self._get_custom_metrics(metric_uris) if uri not in METRIC_URIS]
        self.config.custom_metrics = {uri: kwargs.get(uri) for uri in others} or None
        try:
            yield
        finally:
            self.config.custom_metrics = saved


def metric_value(samples, results, key: str):
    """Metric ``key`` of ``METRICS`` or ``GREC_METRICS`` for a detection run's ``results`` on
    ``samples`` (the ``EvaluationMetric`` operators' computation), scored once per results
    object; the GREC ones count every box of a phrase of zero, one or several objects."""
    generalized = key in {k for k, _, _ in GREC_METRICS}
    attr = "_grec_metrics" if generalized else "_grounding_metrics"
    cached = getattr(results, attr, None)
    if cached is None:
        pred_field, gt_field = results.config.pred_field, results.config.gt_field
        if generalized:
            cached = evaluate_grec(samples, pred_field, gt_field, split_field=None, thresholds=(),
                                   write=False)["overall"]
        else:
            cached = metrics_of(score_samples(samples, pred_field, gt_field), samples, None)["overall"]
        setattr(results, attr, cached)
    return cached.get(key)


def iou_field_of(eval_key: str) -> str:
    """The sample field with each sample's IoU of a grounding evaluation ``eval_key``."""
    return f"{eval_key}_iou"


PLUGIN = "@fiftyone-grounding/grounding"


def metric_uri(key: str) -> str:
    """The URI of this plugin's ``EvaluationMetric`` operator for metric ``key``."""
    return f"{PLUGIN}/{key}"


METRIC_URIS = tuple(metric_uri(key) for key, _, _ in METRICS)
GREC_METRIC_URIS = tuple(metric_uri(key) for key, _, _ in GREC_METRICS)


def _status(iou: float, has_pred: bool, threshold: float) -> str:
    if not has_pred:
        return "fn"
    return "tp" if iou >= threshold else "fp"


def _attributes(status, gt_det, pred_det, iou):
    """(label, its eval value, the id of its match, the match's IoU) as FiftyOne's COCO
    evaluation writes them: an unmatched box gets the id "" and the IoU None."""
    if status == "tp":
        return [(gt_det, "tp", pred_det.id, iou), (pred_det, "tp", gt_det.id, iou)]
    out = [(gt_det, "fn", "", None)]
    if pred_det is not None:
        out.append((pred_det, "fp", "", None))
    return out


def _matches(status, gt_label, gt_id, pred_label, pred_id, iou, confidence) -> list[tuple]:
    """FiftyOne's match tuples ``(gt label, pred label, iou, confidence, gt id, pred id)``: a true
    positive, or an unmatched prediction (with the IoU it reached, for the mAP sweep) and an
    unmatched truth."""
    if status == "tp":
        return [(gt_label, pred_label, iou, confidence, gt_id, pred_id)]
    out = [(gt_label, None, None, None, gt_id, None)]
    if pred_id is not None:
        out.insert(0, (None, pred_label, iou, confidence, None, pred_id))
    return out


class GroundingResults(foud.DetectionResults):
    """The results of a grounding evaluation: FiftyOne's detection results, plus a mAP and mAR over
    IoU 0.50:0.95 computed from each sample's own IoU and ranked by the confidence."""

    def mAP(self, classes=None):
        """COCO-style AP averaged over IoU 0.50, 0.55, ..., 0.95, one class; None when no
        prediction has a confidence to rank it by."""
        preds = self.ypred != self.missing
        confs = self.confs[preds] if self.confs is not None else np.array([])
        if not preds.any() or all(c is None or (isinstance(c, float) and np.isnan(c)) for c in confs):
            return None
        confs = np.array([-np.inf if c is None else float(c) for c in confs])
        ious = np.array([0.0 if v is None else float(v) for v in self.ious[preds]])
        truths = int((self.ytrue != self.missing).sum())
        return float(np.nanmean([average_precision(ious, confs, truths, t) for t in MAP_THRESHOLDS]))

    def mAR(self, classes=None):
        """Recall averaged over IoU 0.50:0.95 (one prediction per expression)."""
        truths = int((self.ytrue != self.missing).sum())
        if truths == 0:
            return None
        preds = self.ypred != self.missing
        ious = np.array([0.0 if v is None else float(v) for v in self.ious[preds]])
        return float(np.mean([(ious >= t).sum() / truths for t in MAP_THRESHOLDS]))

    # FiftyOne filters the results' other arrays to a subset (the panel's scenarios), not the
    # IoUs: keep them aligned, by each row's (true id, predicted id).
    def use_subset(self, subset_def):
        keys = [f"{t}|{p}" for t, p in zip(self.ytrue_ids, self.ypred_ids)]
        iou_of = dict(zip(keys, self.ious))
        self._ious_orig = self.ious
        super().use_subset(subset_def)
        self.ious = np.array([iou_of[f"{t}|{p}"] for t, p in zip(self.ytrue_ids, self.ypred_ids)], dtype=object)
        return self

    def clear_subset(self):
        if self.has_subset:
            self.ious = self._ious_orig
        super().clear_subset()


def evaluate_in_fiftyone(
    view,
    pred_field: str = "predictions",
    gt_field: str = "ground_truth",
    eval_key: str = "eval",
    split_field: Optional[str] = "split",
    scenario_fields: Sequence[str] = SCENARIO_FIELDS,
    custom_metrics: Optional[Sequence[str]] = None,
) -> dict:
    """A grounding evaluation run under ``eval_key``, visible in the App's Model Evaluation panel.

    Where the view has phrases of no or several objects (:func:`has_generalized_phrases`), the
    run is FiftyOne's COCO evaluation (``method="coco"``, mAP computed when every predicted box has a
    confidence, else ``None``) and the result also holds
    ``"grec"`` (:func:`evaluate_grec`), whose Pr@F1=1, N-acc and T-acc are the run's custom metrics.
    FiftyOne's TP/FP/FN and mAP count every stored box (a field applied with a lower
    ``score_thresh`` than 0.7 counts its low boxes there), the GREC metrics only the boxes the
    official threshold keeps.

    Writes, in bulk: ``<eval_key>`` / ``_id`` / ``_iou`` on the scored boxes, ``<eval_key>_tp``,
    ``_fp``, ``_fn`` and the sample IoU ``<eval_key>_iou`` on the scored samples. The run's
    results hold a mAP and mAR over IoU 0.50:0.95 and the grounding metrics (this plugin's
    ``EvaluationMetric`` operators, plus any ``custom_metrics`` URIs). The fields of
    ``scenario_fields`` that the view has become the panel's scenarios. The run is also
    recorded as the custom run ``eval_<eval_key>`` with the checkpoint that wrote ``pred_field``
    (``runs.py``). Returns :func:`evaluate_grounding`'s dict plus ``mAP``, ``tp``, ``fp``,
    ``fn``, ``eval_key`` and ``checkpoint``.
    """
    if has_generalized_phrases(view, gt_field):
        return _evaluate_grec_in_fiftyone(view, pred_field, gt_field, eval_key, split_field, scenario_fields,
                                          custom_metrics)
    scores = score_samples(view, pred_field, gt_field)
    config = GroundingEvaluationConfig(pred_field, gt_field,
                                       custom_metrics=list(METRIC_URIS) + list(custom_metrics or []))
    method = config.build()
    method.ensure_requirements()
    method.register_run(view, eval_key)
    method.register_samples(view, eval_key)
    matches, counts = _write_run(view, eval_key, scores, config)
    labels = sorted({v for v in scores.gt_labels + scores.pred_labels if v is not None})
    results = method.generate_results(view, matches, eval_key=eval_key, classes=labels or None, missing=MISSING)
    method.compute_custom_metrics(view, eval_key, results, scores=scores)
    method.save_run_results(view, eval_key, results)
    method.add_fields_to_sidebar_group(view, eval_key, omit_fields=(pred_field, gt_field))
    register_scenarios(view, [f for f in scenario_fields if view.has_field(f)])
    metrics = {**metrics_of(scores, view, split_field), "iou_field": iou_field_of(eval_key)}
    out = {**metrics, "mAP": results.mAP(), "mAR": results.mAR(), **counts, "eval_key": eval_key}
    written = [iou_field_of(eval_key)] + [f"{eval_key}_{name}" for name in ("tp", "fp", "fn")]
    record_evaluation(view, eval_key, pred_field, gt_field, written,
                      {"mAP": out["mAP"], **{key: out["overall"][key] for key, _, _ in METRICS}})
    return {**out, "checkpoint": checkpoint_of(view, pred_field)}


def _evaluate_grec_in_fiftyone(view, pred_field: str, gt_field: str, eval_key: str, split_field: Optional[str],
                               scenario_fields: Sequence[str], custom_metrics) -> dict:
    """FiftyOne's COCO evaluation of the boxes, with the GREC metrics as the run's custom metrics."""
    # FiftyOne's PR curves need a confidence on every box; boxes written without one get no mAP
    scored = view.count(f"{pred_field}.detections") == view.count(f"{pred_field}.detections.confidence")
    results = view.evaluate_detections(pred_field, gt_field=gt_field, eval_key=eval_key, method="coco",
                                       compute_mAP=scored, custom_metrics=list(custom_metrics or []) or None,
                                       progress=False)
    generalized = evaluate_grec(view, pred_field, gt_field, split_field)
    results.custom_metrics = dict(results.custom_metrics or {})
    for key, label, lower_is_better in GREC_METRICS:
        value = generalized["overall"][key]
        if value is not None:
            results.custom_metrics[metric_uri(key)] = {"key": key, "value": value, "label": label,
                                                       "lower_is_better": lower_is_better}
    results.save()
    register_scenarios(view, [f for f in scenario_fields if view.has_field(f)])
    scores = score_samples(view, pred_field, gt_field)
    counts = {name: int(sum(v or 0 for v in view.values(f"{eval_key}_{name}"))) for name in ("tp", "fp", "fn")}
    mAP = results.mAP() if scored else None
    record_evaluation(view, eval_key, pred_field, gt_field, [f"{eval_key}_{name}" for name in ("tp", "fp", "fn")],
                      {"mAP": mAP, **{key: generalized["overall"][key] for key, _, _ in GREC_METRICS}})
    return {**metrics_of(scores, view, split_field), "iou_field": None, "grec": generalized,
            "mAP": mAP, "mAR": results.mAR() if scored else None, **counts, "eval_key": eval_key,
            "checkpoint": checkpoint_of(view, pred_field)}


def _write_run(view, eval_key: str, scores: SampleScores, config: GroundingEvaluationConfig
               ) -> tuple[list, dict]:
    """Bulk-write the run's sample fields and box attributes; returns its matches and counts."""
    dataset = root_dataset(view)
    threshold = config.iou
    matches = []
    # every sample of the view gets counts, the unscored ones 0 (as FiftyOne's own loop writes)
    tp, fp, fn = ({sid: 0 for sid in scores.ids} for _ in range(3))
    box_values = {}  # label id -> (eval value, match id, match IoU)
    for i in np.flatnonzero(scores.scored):
        sid, iou = scores.ids[i], float(scores.ious[i])
        has_pred = scores.pred_ids[i] is not None
        status = _status(iou, has_pred, threshold)
        matches.extend(_matches(status, scores.gt_labels[i], scores.gt_ids[i], scores.pred_labels[i],
                                scores.pred_ids[i], iou, scores.confidences[i]))
        tp[sid], fp[sid], fn[sid] = int(status == "tp"), int(status == "fp"), int(status != "tp")
        if status == "tp":
            box_values[scores.gt_ids[i]] = ("tp", scores.pred_ids[i], iou)
            box_values[scores.pred_ids[i]] = ("tp", scores.gt_ids[i], iou)
        else:
            box_values[scores.gt_ids[i]] = ("fn", "", None)
            if has_pred:
                box_values[scores.pred_ids[i]] = ("fp", "", None)
    for name, values in (("tp", tp), ("fp", fp), ("fn", fn)):
        dataset.set_values(f"{eval_key}_{name}", values, key_field="id", validate=False)
    write_sample_values(view, iou_field_of(eval_key), [scores.ids[i] for i in np.flatnonzero(scores.scored)],
                         [float(scores.ious[i]) for i in np.flatnonzero(scores.scored)])
    for field in (config.gt_field, config.pred_field):
        _write_box_attributes(view, field, eval_key, box_values)
    return matches, {"tp": sum(tp.values()), "fp": sum(fp.values()), "fn": sum(fn.values())}


WRITE_CHUNK = 8192  # documents changed per bulk write


def _write_box_attributes(view, field: str, eval_key: str, box_values: dict) -> None:
    """``<eval_key>``, ``_id`` and ``_iou`` on every box of ``field`` that the run scored: the
    field's documents read a page at a time, changed and written back whole (a bulk write of
    ``WRITE_CHUNK`` documents, not one per attribute)."""
    dataset = root_dataset(view)
    changed = {}
    for sid, _, doc in stream_by_filepath(view, (field,)):  # a page of documents at a time, not all of them
        dets = (doc or {}).get("detections") or []
        if not any(str(det["_id"]) in box_values for det in dets):
            continue
        for det in dets:
            value, match, iou = box_values.get(str(det["_id"]), (None, None, None))
            det[eval_key], det[f"{eval_key}_id"], det[f"{eval_key}_iou"] = value, match, iou
        changed[sid] = doc
        if len(changed) == WRITE_CHUNK:
            dataset.set_values(field, changed, key_field="id", validate=False)
            changed = {}
    if changed:
        dataset.set_values(field, changed, key_field="id", validate=False)


def register_scenarios(view, fields: Sequence[str]) -> list[str]:
    """Make ``fields`` (sample fields such as ``split``, ``category``) scenarios of the App's Model
    Evaluation panel for the dataset, each subset one of the field's values in ``view``; an
    existing scenario of the same field is updated. Returns the scenario names."""
    from bson import ObjectId
    from fiftyone.operators.store import ExecutionStore

    if not fields:
        return []
    dataset = root_dataset(view)
    # the store and record layout of the panel's own "Create scenario" operator (FiftyOne's
    # plugins/utils/model_evaluation: store "model_evaluation_panel_builtin", key "scenarios")
    store = ExecutionStore.create("model_evaluation_panel_builtin", dataset_id(dataset))
    scenarios = dict(store.get("scenarios") or {})
    names = []
    for field in fields:
        values = sorted((v for v in view.distinct(field) if v is not None), key=str)
        if not values:
            continue
        existing = next((s for s in scenarios.values() if s.get("type") == "sample_field" and s.get("field") == field),
                        None)
        scenario_id = existing["id"] if existing else str(ObjectId())
        scenarios[scenario_id] = {"id": scenario_id, "name": field, "type": "sample_field", "field": field,
                                  "subsets": values}
        names.append(field)
    store.set("scenarios", scenarios)
    return names
