"""The benchmark scripts run (tiny preset, CPU, a few steps) and report consistent figures.

No timing is asserted: these check that every mode runs, that the paths agree where they
must (same boxes from the loop, ``apply_grounding_model`` and FiftyOne's ``apply_model``),
and that the JSON holds the figures the README quotes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # the benchmark scripts, each end to end


# the options every benchmark gets here: the CPU, one thread (what a script has of them)
COMMON = {"evaluate_throughput": ["--device", "cpu"], "flops": [], "compare_architectures": ["--threads", "1"],
          "recipe_step": ["--device", "cpu"], "search_quality": ["--threads", "1"]}


def run_benchmark(script, tmp_path, *args, fresh_process=False):
    """The script's figures (its --json) and what it printed. It runs in this process through its
    ``main(argv)`` (a fresh interpreter costs 5 s of imports), in the folder it would be started
    from, with torch's thread count restored after; ``fresh_process`` starts it as a user would
    (``python benchmarks/x.py``) where what the process imported is itself a figure."""
    out = tmp_path / f"{script}.json"
    argv = [*COMMON.get(script, ["--device", "cpu", "--threads", "1"]), "--json", str(out), *args]
    if fresh_process:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *argv],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text()), proc.stdout
    import contextlib
    import importlib.util
    import io

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import _bench_common beside them
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    stdout, threads, cwd = io.StringIO(), torch.get_num_threads(), os.getcwd()
    try:
        spec.loader.exec_module(module)
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(stdout):
            module.main(argv)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        sys.path.remove(str(REPO / "benchmarks"))
    return json.loads(out.read_text()), stdout.getvalue()


def test_train_throughput_runs_every_mode(tmp_path):
    result, stdout = run_benchmark("train_throughput", tmp_path, "--preset", "tiny", "--batch-size", "14",
                                   "--steps", "1", "--warmup", "1", "--repeats", "1",
                                   "--modes", "seed,grouped,cached,cached_text")
    rates = {mode: r["expressions_per_s"] for mode, r in result["results"].items()}
    assert set(rates) == {"seed", "grouped", "cached", "cached_text"}
    assert all(rate > 0 for rate in rates.values())
    assert "cached_text" in stdout


def test_train_throughput_of_an_architecture_that_cannot_cache(tmp_path):
    result, stdout = run_benchmark("train_throughput", tmp_path, "--preset", "tiny-adapter", "--batch-size", "14",
                                   "--steps", "1", "--warmup", "1", "--repeats", "1", "--modes", "grouped,cached")
    assert set(result["results"]) == {"grouped"} and result["cache"] is None
    assert "no cached modes" in stdout


def test_flops_counts_every_part_of_a_training_step(tmp_path):
    result, stdout = run_benchmark("flops", tmp_path, "--presets", "tiny", "tiny-fusion", "tiny-adapter",
                                   "tiny-fusion-multi")
    rows = {(r["preset"], r["image_features"]): r for r in result["rows"]}
    assert set(rows) == {("tiny", "cached"), ("tiny", "encoded"), ("tiny-fusion", "cached"),
                         ("tiny-fusion", "encoded"), ("tiny-adapter", "encoded"), ("tiny-fusion-multi", "cached"),
                         ("tiny-fusion-multi", "encoded")}
    for (preset, features), r in rows.items():
        parts = r["gflops_by_part_per_expression"]
        assert sum(parts.values()) == pytest.approx(r["gflops_per_expression"])
        assert ("image_encoder" in parts) == (features == "encoded") and r["expected_step_ms"] > 0
    # the encoder's share is what the cache saves; the adapter runs its upper blocks per phrase
    fusion = rows[("tiny-fusion", "encoded")]["gflops_by_part_per_expression"]
    assert rows[("tiny-fusion", "encoded")]["gflops_per_expression"] - rows[("tiny-fusion", "cached")][
        "gflops_per_expression"] == pytest.approx(fusion["image_encoder"])
    adapter = rows[("tiny-adapter", "encoded")]["gflops_by_part_per_expression"]
    assert adapter["image_encoder"] > rows[("tiny", "encoded")]["gflops_by_part_per_expression"]["image_encoder"]


def test_compare_architectures_trains_each_alike_and_scores_each_kind(tmp_path, dataset_name):
    result, stdout = run_benchmark("compare_architectures", tmp_path, "--presets", "tiny", "tiny-adapter",
                                   "--num-images", "30", "--epochs", "1", "--relational-fraction", "0.9",
                                   "--dataset", dataset_name, "--out-dir", str(tmp_path / "out"), "--no-progress")
    results = result["results"]
    assert set(results) == {"tiny", "tiny-adapter"} and result["args"]["epochs"] == 1
    for r in results.values():
        assert r["epochs"] == 1 and r["overall"]["count"] == r["attribute"]["count"] + r["relational"]["count"]
        assert 0 <= r["relational"]["acc50"] <= 1
    assert "| `tiny-adapter` |" in stdout and result["table"] in stdout


def test_apply_throughput_paths_write_the_same_boxes(tmp_path):
    result, _ = run_benchmark("apply_throughput", tmp_path, "--images", "4", "--phrases-per-image", "3",
                              "--batch-sizes", "8", "--repeats", "1", "--workers", "2")
    assert result["mode"] == "fiftyone" and result["samples"] == 12
    assert set(result["results"]) == {"loop", "apply_8", "fo_apply_8"}
    assert all(diff < 1e-4 for diff in result["max_box_difference"].values()) and result["boxes_match"]
    assert set(result["ratio_vs_loop"]) == {"apply_8", "fo_apply_8"}
    apply = result["results"]["apply_8"]  # 4 images x 3 phrases: 2 batches, so a start-up and a rest
    assert 0 < apply["seconds_to_first_batch"] < apply["seconds_median"]
    assert apply["expressions_per_s_after_first_batch"] > 0
    assert (apply["workers"], apply["worker_type"]) == (2, "thread")  # FiftyOne's apply_model: processes
    assert result["results"]["fo_apply_8"]["worker_type"] == "process"


def test_fit_throughput_trains_through_fit(tmp_path):
    result, stdout = run_benchmark("fit_throughput", tmp_path, "--images", "6", "--epochs", "2",
                                   "--batch-size", "8")
    assert result["expressions"] == 42 and len(result["epochs"]) == 2
    assert all(e["seconds"] > 0 and e["expressions_per_s"] > 0 for e in result["epochs"])
    assert "Cached image features of 6 images" in stdout


def test_evaluate_throughput_times_every_step(tmp_path):
    result, stdout = run_benchmark("evaluate_throughput", tmp_path, "--samples", "60", "--fiftyone-loop",
                                   fresh_process=True)  # (it checks that evaluating never imports torch)
    assert result["samples"] == 60 and not result["torch_imported"]
    assert set(result["seconds"]) == {"evaluate_grounding", "evaluate_in_fiftyone", "panel", "end_to_end",
                                      "delete", "fiftyone_loop"}
    assert result["mAP"] == result["fiftyone_loop_mAP"]  # the bulk run and FiftyOne's loop agree
    assert result["panel"]["matrix_shape"] == [2, 2] and result["panel"]["classes"] == ["referent"]
    assert 0 < result["metrics"]["auroc"] <= 1 and result["peak_rss_mib"] > result["baseline_rss_mib"]


def test_search_throughput_times_the_cold_and_the_cached_search(tmp_path):
    result, stdout = run_benchmark("search_throughput", tmp_path, "--images", "12", "--batch-size", "8",
                                   "--repeats", "1")
    assert set(result["results"]) == {"cold", "cached"} and result["boxes"] == 12
    assert all(r["images_per_s"] > 0 for r in result["results"].values())
    assert "100,000 images take" in stdout


def test_recipe_step_measures_each_recipe_at_its_batch_size(tmp_path):
    result, stdout = run_benchmark("recipe_step", tmp_path, "--recipes", "refcoco_tiny", "grefcoco_tiny_fusion_multi",
                                   "--steps", "1", "--warmup", "0")
    rows = {r["recipe"]: r for r in result["results"]}
    assert rows["refcoco_tiny"]["batch_size"] == json.loads((REPO / "training" / "refcoco_tiny.json").read_text())[
        "batch_size"]
    assert all(r["step_seconds"] > 0 and r["peak_memory_gib"] is None for r in rows.values())  # (no GPU here)
    assert rows["grefcoco_tiny_fusion_multi"]["preset"] == "tiny-fusion-multi" and "ms/step" in stdout


def test_search_quality_ranks_with_and_without_absent_pairs(tmp_path, dataset_name):
    result, stdout = run_benchmark("search_quality", tmp_path, "--num-images", "40", "--epochs", "1",
                                   "--scenes", "30", "--dataset", dataset_name,
                                   "--out-dir", str(tmp_path / "out"), "--no-progress", "--shares", "0", "0.25")
    assert set(result["results"]) == {"0", "0.25"}
    for r in result["results"].values():
        assert 0 <= r["mean"]["ap"] <= 1 and 0 < r["mean"]["random"] < 1
    assert "search mean AP" in stdout


def test_cpu_presets_reports_each_presets_rate_and_the_time_for_10000_images(tmp_path):
    result, stdout = run_benchmark("cpu_presets", tmp_path, "--presets", "tiny,tiny-fusion", "--images", "3")
    assert set(result["presets"]) == {"tiny", "tiny-fusion"} and result["threads"] == 1
    for preset, row in result["presets"].items():
        assert row["images"] == 3 and row["expressions"] == 6 and row["images_per_s"] > 0
        assert row["seconds_for_10000_images"] == pytest.approx(10_000 / row["images_per_s"])
        assert f"  {preset} " in stdout and "10,000 images:" in stdout


def test_scale_measures_each_stage_in_its_own_process(tmp_path, tiny_checkpoint):
    """One small size and two stages (each stage's process costs seconds of imports; apply,
    evaluate, search and label errors run the commands other tests run); the ratios are checked
    below on given figures."""
    stages = ["import", "apply_2proc"]
    result, stdout = run_benchmark("scale", tmp_path, "--sizes", "100", "--pool", "10", "--stages", *stages,
                                   "--checkpoint", tiny_checkpoint, fresh_process=True)
    assert set(result["results"]) == {"100"} and not result["problems"]
    rows = result["results"]["100"]
    assert list(rows) == stages
    for stage, r in rows.items():
        assert r["seconds"] > 0 and r["per_second"] > 0 and r["peak_mib"] >= r["start_mib"] > 0, stage
        assert r["process_seconds"] > r["seconds"] and r["phrases"] == 100 and r["images"] == 10
    assert len(rows["apply_2proc"]["ranks"]) == 2
    assert all(f"| {stage} | " in stdout for stage in stages)
    assert not Path(result["workdir"]).exists()  # images, caches and logs deleted (and the datasets)


def test_scale_ratios_say_linear_time_and_flat_memory():
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmark_scale", REPO / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    row = {"seconds": 10.0, "phrases": 1000, "peak_mib": 800.0, "start_mib": 700.0}
    results = {"1000": {"apply": row}, "10000": {"apply": {**row, "seconds": 100.0, "phrases": 10000}},
               "100000": {"apply": {**row, "seconds": 2000.0, "phrases": 100000, "peak_mib": 1600.0}}}
    ratios = scale.ratios_of(results, [1000, 10000, 100000], ["apply"])
    assert ratios["apply"] == {"time_per_phrase": 2.0, "peak_memory": 2.0, "growth_mib": [100.0, 900.0]}
    assert "| apply | 2.00 | 2.00 | 100 -> 900 |" in scale.format_ratios(ratios, [1000, 10000, 100000])
