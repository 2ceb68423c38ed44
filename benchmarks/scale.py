"""Scale: how each stage's time and memory grow with the dataset, from 10,000 to 1,000,000 phrases.

On the CPU with the ``tiny`` preset, for each size (``--sizes``: phrases; images: a tenth as many,
``--phrases-per-image`` 10), every stage runs in its own fresh process and is measured there:

  import        the FiftyOne dataset made: the images on disk, then one sample per phrase added
                ``DEFAULT_CHUNK_SIZE`` (1,000) at a time as the RefCOCO importer adds them
  apply         ``fiftyone-grounding apply`` (``apply_grounding_model``), 1 process
  apply_2proc   the same under ``torchrun --nproc_per_node 2 ... apply --distributed`` (each rank
                ``--threads``/2 torch threads, at least 1, ``OMP_NUM_THREADS``): seconds from the first
                rank's start to the last rank's end, peak memory the largest rank's
  evaluate      ``fiftyone-grounding evaluate --eval-key`` (``evaluate_in_fiftyone``) of ``apply``'s boxes
  search        ``fiftyone-grounding search "the red circle" --no-cache``: one phrase over every image
                (``search_phrase``: every image decoded and encoded, the ranking read), images/s
  label_errors  ``fiftyone-grounding label-errors --checkpoint``: every sample scored by a checkpoint
                that never saw it (``compute_label_errors(view, model=CHECKPOINT)``; its feature cache
                of every image built on the way)

Seconds are the stage's own work in its process (after its imports: the process's start-up is
reported apart, ``process_seconds``); throughput is phrases/s (search: images/s); peak memory is
the process's peak resident set (``VmHWM``, MiB), which includes what the imports hold (reported
as ``start_mib``, the resident set when the work starts). The checkpoint is trained ONCE, on a
separate synthetic set (``--train-images`` 2,000 images, ``--train-epochs`` 3; or ``--checkpoint``),
and reused for every size. Then the ratios that matter: the time per phrase at the largest size
over the smallest (linear: about 1) and the peak memory at the largest over the smallest (flat:
about 1).

Images: a pool of ``--pool`` distinct scenes (``SyntheticSpec.example``, ``--phrases-per-image``
objects each, one phrase per object, 64 px PNGs) is drawn once; every image of a dataset has its
own path (images are grouped by path) but is a hard link to a pool image, so 100,000 images cost
100,000 links, not 100,000 drawings (the generator draws a 10-object scene in about 6 ms). The
datasets, the images, the checkpoint and the caches live in a temporary folder (and FiftyOne
datasets) deleted at the end unless ``--keep``.

    python benchmarks/scale.py --sizes 10000 100000 --json out/scale.json
    python benchmarks/scale.py --sizes 1000000 --checkpoint runs/scale/best     # reuse a checkpoint
    python benchmarks/scale.py --sizes 200 400 --train-images 40 --train-epochs 1 --pool 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/scale.py` without PYTHONPATH=. also works
    sys.path.insert(0, str(REPO))

STAGES = ("import", "apply", "apply_2proc", "evaluate", "search", "label_errors")
UNITS = {"search": "images"}  # the others: phrases
SPLITS = ["train"] * 8 + ["val", "test"]  # by image
SEARCH_PHRASE = "the red circle"
FIELDS = {"apply": "pred_1proc", "apply_2proc": "pred_2proc", "search": "scale_search",
          "label_errors": "label_error"}
EVAL_KEY = "scale"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                   help="dataset sizes in phrases (images: sizes / --phrases-per-image)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="the stages to run (import always runs: the others need its dataset; evaluate brings apply, "
                        "whose boxes it scores)")
    p.add_argument("--phrases-per-image", type=int, default=10, help="phrases (samples) per image")
    p.add_argument("--pool", type=int, default=500, help="distinct drawn images the images are hard links to")
    p.add_argument("--image-size", type=int, default=64, help="side of the drawn images in pixels")
    p.add_argument("--train-images", type=int, default=2000,
                   help="images of the separate training set (2 phrases each)")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of the one training run")
    p.add_argument("--checkpoint", default=None, help="score with this tiny checkpoint instead of training one")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of a one-process stage; each of apply_2proc's 2 ranks gets half (at least 1). "
                        "1: one process per core, what apply_2proc is compared with (2 threads on a busy 2-core "
                        "machine ran apply 2.8x slower than 1)")
    p.add_argument("--device", default="cpu", help="the device of every stage (this benchmark is meant for the CPU; "
                                                   "with cuda, each rank of apply_2proc takes cuda:LOCAL_RANK)")
    p.add_argument("--procs", type=int, default=2, help="ranks of the distributed apply stage (apply_2proc)")
    p.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the datasets, images, checkpoint and logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every figure here")
    # one stage in this process (what the benchmark starts; not for users)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _mib_of(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    import resource  # (no /proc: the peak only)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one stage, in its own process -------------------------------------------------------------


def _cli(*argv) -> None:
    from fiftyone_grounding.cli import main

    main([str(a) for a in argv])


def stage_train(args) -> dict:
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.fit import fit

    out = Path(args.out_dir)
    dataset = make_synthetic_dataset(args.dataset, num_images=args.train_images, out_dir=str(out / "train_images"),
                                     seed=args.seed, overwrite=True, progress=False)
    run = fit(dataset, preset="tiny", out_dir=str(out / "train_run"), epochs=args.train_epochs, seed=args.seed,
              resume=False, progress=False, cpu=True)
    return {"checkpoint": str(run.best_dir), "best_val_iou": run.best_val_iou, "train_phrases": len(dataset)}


def stage_import(args) -> dict:
    """Hard-link one file per image to the pool, then add the samples 1,000 at a time."""
    import fiftyone as fo

    from fiftyone_grounding.data.labels import declare_expression_attribute, make_detections
    from fiftyone_grounding.sources.base import DEFAULT_CHUNK_SIZE

    pool = json.loads(Path(args.manifest).read_text())
    ppi = args.phrases_per_image
    images = args.size // ppi
    folder = Path(args.out_dir)
    dataset = fo.Dataset(args.dataset)
    dataset.persistent = True
    chunk, added = [], 0
    for i in range(images):
        entry = pool[i % len(pool)]
        sub = folder / f"{i // 10_000:03d}"
        if i % 10_000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        path = str(sub / f"{i:07d}.png")
        os.link(entry["path"], path)
        metadata = fo.ImageMetadata(width=entry["width"], height=entry["height"], num_channels=3,
                                    mime_type="image/png", size_bytes=entry["size_bytes"])
        split = SPLITS[i % len(SPLITS)]
        for j in range(ppi):
            ref = entry["phrases"][j % len(entry["phrases"])]
            chunk.append(fo.Sample(filepath=path, tags=[split], metadata=metadata, expression=ref["phrase"],
                                   ground_truth=make_detections(ref["box"], ref["phrase"]), split=split,
                                   image_id=i, ref_id=i * ppi + j, sent_id=i * ppi + j, category=ref["category"],
                                   referent_kind=ref["referent_kind"]))
            if len(chunk) >= DEFAULT_CHUNK_SIZE:
                dataset.add_samples(chunk, progress=False)
                added += len(chunk)
                chunk = []  # (FiftyOne reloads every live Sample of the dataset after a write: drop them)
    if chunk:
        dataset.add_samples(chunk, progress=False)
        added += len(chunk)
    declare_expression_attribute(dataset, "ground_truth")
    return {"added": added, "images": images}


def stage_apply(args) -> dict:
    _cli("apply", "--dataset", args.dataset, "--checkpoint", args.checkpoint, "--device", args.device,
         "--label-field", FIELDS["apply_2proc" if args.distributed else "apply"],
         *(["--distributed"] if args.distributed else []))
    return {}


def stage_evaluate(args) -> dict:
    _cli("evaluate", "--dataset", args.dataset, "--label-field", FIELDS["apply"], "--eval-key", EVAL_KEY)
    return {}


def stage_search(args) -> dict:
    _cli("search", "--dataset", args.dataset, SEARCH_PHRASE, "--checkpoint", args.checkpoint, "--device", args.device,
         "--label-field", FIELDS["search"], "--no-cache")
    return {}


def stage_label_errors(args) -> dict:
    _cli("label-errors", "--dataset", args.dataset, "--checkpoint", args.checkpoint, "--device", args.device,
         "--no-progress")
    return {}


def run_stage(args) -> None:
    """Run one stage here and write its figures to ``--result`` (``.rank<R>`` under a launcher)."""
    import fiftyone  # noqa: F401  (imported before the start: what the stage holds, not what it imports)
    import torch

    import fiftyone_grounding.cli  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    start_mib = _mib_of("VmRSS")
    t0 = time.time()
    out = globals()[f"stage_{args.stage.replace('_2proc', '')}"](args)
    t1 = time.time()
    out.update(stage=args.stage, rank=rank, world_size=world, start=t0, end=t1, seconds=t1 - t0,
               start_mib=start_mib, peak_mib=_mib_of("VmHWM"), torch_threads=torch.get_num_threads())
    path = args.result + (f".rank{rank}" if world > 1 else "")
    Path(path).write_text(json.dumps(out))


# -- the benchmark: every stage of every size, each in a child process --------------------------


def draw_pool(folder: Path, count: int, ppi: int, image_size: int, seed: int) -> list[dict]:
    """``count`` distinct scenes of ``ppi`` objects (at most 10: more do not fit a 64 px image
    often enough), one phrase per object (cycled where ``ppi`` is larger)."""
    from fiftyone_grounding.data.synthetic import SyntheticSpec, referent_kind

    objects_per_image = min(ppi, 10)
    spec = SyntheticSpec(num_images=count, image_size=image_size, expressions_per_image=objects_per_image,
                         min_objects=objects_per_image, max_objects=objects_per_image, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    pool = []
    for i in range(count):
        image, objects, expressions = spec.example(i)
        path = folder / f"pool_{i:05d}.png"
        image.save(path)
        pool.append({"path": str(path), "width": image_size, "height": image_size, "size_bytes": path.stat().st_size,
                     "phrases": [{"phrase": phrase, "box": list(objects[targets[0]]["box_xyxy"]),
                                  "category": objects[targets[0]]["shape"], "referent_kind": referent_kind(phrase)}
                                 for targets, phrase, _ in expressions]})
    return pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(threads: int) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_child(args, stage: str, result: Path, log: Path, **options) -> dict:
    """Start ``stage`` in a fresh process (2 ranks under torchrun for ``apply_2proc``), wait for it
    and return its figures: what each rank measured itself, plus the process's wall time. (Each
    process reads its own ``VmHWM``: the ``ru_maxrss`` the kernel reports on reaping a child also
    counts the image it was forked from before its ``exec``, 908 MiB for a stage that peaked at 778.)"""
    distributed = stage == "apply_2proc"
    threads = max(1, args.threads // args.procs) if distributed else args.threads
    flags = ["--stage", stage, "--result", str(result), "--threads", str(threads), "--device", args.device,
             "--phrases-per-image", str(args.phrases_per_image), "--seed", str(args.seed)]
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    if distributed:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs), "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), *flags, "--distributed"]
    else:
        command = [sys.executable, str(SCRIPT), *flags]
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_child_env(threads),
                                start_new_session=True)
        try:
            proc.wait()
        except BaseException:  # Ctrl-C: stop the stage and its ranks too
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"stage {stage} failed (exit status {proc.returncode}); the end of {log}:\n{tail}")
    paths = [result.with_name(f"{result.name}.rank{r}") for r in range(args.procs)] if distributed else [result]
    ranks = [json.loads(p.read_text()) for p in paths]
    first, last = min(r["start"] for r in ranks), max(r["end"] for r in ranks)
    figures = {"seconds": last - first, "peak_mib": max(r["peak_mib"] for r in ranks),
               "start_mib": max(r["start_mib"] for r in ranks), "process_seconds": wall,
               "torch_threads": ranks[0]["torch_threads"]}
    if distributed:
        figures["ranks"] = [{k: r[k] for k in ("seconds", "start_mib", "peak_mib")} for r in ranks]
    figures.update({k: v for k, v in ranks[0].items() if k not in figures and k not in
                    ("stage", "rank", "world_size", "start", "end")})
    return figures


def check_stage(dataset_name: str, stage: str, size: int) -> str:
    """What the stage left in the dataset, checked: "" where right, else what is wrong."""
    import fiftyone as fo

    dataset = fo.load_dataset(dataset_name)
    dataset.reload()
    if stage == "import":
        return "" if len(dataset) == size else f"{len(dataset)} samples, not {size}"
    if stage == "evaluate":
        return "" if EVAL_KEY in dataset.list_evaluations() else f"no evaluation {EVAL_KEY!r}"
    field = FIELDS[stage]
    written = dataset.exists(field).count() if dataset.has_field(field) else 0
    return "" if written == size else f"{field!r} on {written} of {size} samples"


def format_table(results: dict, sizes: list, stages: list) -> str:
    head = "| stage | " + " | ".join(f"{s:,} phrases: s | per s | peak MiB" for s in sizes) + " |"
    rows = [head, "|---|" + "---:|---:|---:|" * len(sizes)]
    for stage in stages:
        cells = []
        for size in sizes:
            r = results.get(str(size), {}).get(stage)
            cells.append("- | - | -" if r is None else
                         f"{r['seconds']:,.1f} | {r['per_second']:,.0f} {r['unit']} | {r['peak_mib']:,.0f}")
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratios_of(results: dict, sizes: list, stages: list) -> dict:
    small, large = str(min(sizes)), str(max(sizes))
    out = {}
    for stage in stages:
        a, b = results.get(small, {}).get(stage), results.get(large, {}).get(stage)
        if a is None or b is None or small == large:
            continue
        out[stage] = {"time_per_phrase": (b["seconds"] / b["phrases"]) / (a["seconds"] / a["phrases"]),
                      "peak_memory": b["peak_mib"] / a["peak_mib"],
                      "growth_mib": [a["peak_mib"] - a["start_mib"], b["peak_mib"] - b["start_mib"]]}
    return out


def format_ratios(ratios: dict, sizes: list) -> str:
    small, large = min(sizes), max(sizes)
    rows = [f"| stage | time per phrase, {large:,} / {small:,} (linear: 1) | peak MiB, {large:,} / {small:,} "
            f"(flat: 1) | MiB above the start, {small:,} -> {large:,} |", "|---|---:|---:|---:|"]
    for stage, r in ratios.items():
        rows.append(f"| {stage} | {r['time_per_phrase']:.2f} | {r['peak_memory']:.2f} | "
                    f"{r['growth_mib'][0]:,.0f} -> {r['growth_mib'][1]:,.0f} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")  # MongoDB 6.0 notice
    os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage:
        run_stage(args)
        return {}
    ppi = args.phrases_per_image
    bad = [s for s in args.sizes if s < ppi or s % ppi]
    if bad:
        raise SystemExit(f"--sizes must be multiples of --phrases-per-image ({ppi}): {bad}")
    sizes = sorted(set(args.sizes))
    # import always runs (every stage needs its dataset), and evaluate scores apply's boxes
    wanted = set(args.stages) | {"import"} | ({"apply"} if "evaluate" in args.stages else set())
    stages = [s for s in STAGES if s in wanted]
    import fiftyone as fo

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="fog-scale-", dir=args.workdir))
    # generated tiny encoders, the training run's and label errors' feature caches: all in the folder
    os.environ["FIFTYONE_GROUNDING_HOME"] = str(tmp / "home")
    (tmp / "logs").mkdir()
    tag = uuid.uuid4().hex[:8]
    made: list[str] = []
    results: dict = {}
    extra: dict = {"workdir": str(tmp), "threads": args.threads}
    problems = []
    try:
        print(f"scale benchmark in {tmp}: sizes {', '.join(f'{s:,}' for s in sizes)} phrases "
              f"({ppi} per image), stages {', '.join(stages)}; {args.threads} torch threads per one-process stage, "
              f"{max(1, args.threads // 2)} per rank of apply_2proc; FiftyOne {fo.__version__}, database "
              f"{os.environ['FIFTYONE_DATABASE_NAME']!r}", flush=True)
        checkpoint = args.checkpoint
        if checkpoint is None and any(s in stages for s in ("apply", "apply_2proc", "search", "label_errors")):
            name = f"fog-scale-train-{tag}"
            made.append(name)
            train = run_child(args, "train", tmp / "train.json", tmp / "logs" / "train.log", dataset=name,
                              out_dir=tmp, train_images=args.train_images, train_epochs=args.train_epochs)
            checkpoint = train["checkpoint"]
            extra["training"] = {k: train[k] for k in ("seconds", "best_val_iou", "train_phrases", "peak_mib")}
            print(f"trained tiny once: {args.train_images:,} images ({train['train_phrases']:,} phrases), "
                  f"{args.train_epochs} epochs, {train['seconds']:.0f} s, val IoU {train['best_val_iou']:.3f}: "
                  f"{checkpoint}", flush=True)
        extra["checkpoint"] = checkpoint
        t0 = time.time()
        pool = draw_pool(tmp / "pool", args.pool, ppi, args.image_size, args.seed + 1000)
        manifest = tmp / "pool.json"
        manifest.write_text(json.dumps(pool))
        extra["pool"] = {"images": args.pool, "seconds": time.time() - t0,
                         "phrases_per_image": min(ppi, len(pool[0]["phrases"]))}
        print(f"drew a pool of {args.pool} distinct {args.image_size} px images of {min(ppi, 10)} objects in "
              f"{time.time() - t0:.1f} s; every image of a dataset is its own path, a hard link to one of them",
              flush=True)

        for size in sizes:
            name = f"fog-scale-{size}-{tag}"
            made.append(name)
            images = size // ppi
            results[str(size)] = {}
            for stage in stages:
                options = {"dataset": name}
                if stage == "import":
                    options.update(size=size, manifest=manifest, out_dir=tmp / f"images_{size}")
                if stage not in ("import", "evaluate"):
                    options["checkpoint"] = checkpoint
                r = run_child(args, stage, tmp / f"{size}_{stage}.json", tmp / "logs" / f"{size}_{stage}.log",
                              **options)
                unit = UNITS.get(stage, "phrases")
                r.update(phrases=size, images=images, unit=unit,
                         per_second=(images if unit == "images" else size) / max(r["seconds"], 1e-9))
                problem = check_stage(name, stage, size)
                if problem:
                    problems.append(f"{size:,} {stage}: {problem}")
                    r["problem"] = problem
                results[str(size)][stage] = r
                ranks = (" (ranks: " + ", ".join(f"{x['seconds']:.1f} s {x['peak_mib']:,.0f} MiB" for x in r["ranks"])
                         + ")") if "ranks" in r else ""
                print(f"  {size:>9,} {stage:<12} {r['seconds']:9.1f} s  {r['per_second']:9,.0f} {unit}/s  peak "
                      f"{r['peak_mib']:7,.0f} MiB (start {r['start_mib']:,.0f}){ranks}; process "
                      f"{r['process_seconds']:.1f} s" + (f"  PROBLEM: {problem}" if problem else ""), flush=True)
    finally:
        if args.keep:
            print(f"kept: the folder {tmp} and the datasets {made}")
        else:
            for name in made:
                if fo.dataset_exists(name):
                    fo.delete_dataset(name)
            shutil.rmtree(tmp, ignore_errors=True)

    table = format_table(results, sizes, stages)
    ratios = ratios_of(results, sizes, stages)
    print("\n" + table)
    if ratios:
        print("\n" + format_ratios(ratios, sizes))
    extra.update(ratios=ratios, total_seconds=time.time() - started, problems=problems,
                 note=f"images: hard links to a pool of {args.pool} distinct drawn images; seconds: the stage's work "
                      "after its process's imports; peak: the process's VmHWM (apply_2proc: the larger rank's)")
    print(f"\ntotal {time.time() - started:,.0f} s" + (f"; PROBLEMS: {problems}" if problems else ""))
    import _bench_common

    summary = _bench_common.summarize("scale", argv if argv is not None else sys.argv[1:], args, results, table,
                                      **extra)
    if problems:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
