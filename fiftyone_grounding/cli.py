"""``fiftyone-grounding``: command-line entry point. Each subcommand calls one library function.

Every ``GroundingError`` ends the command with one line, ``error: <what to do>``, and exit
status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .demo import DEMO_DEFAULTS, TASKS
from .models.config import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS
from .sources.base import COMBINED, DEFAULT_CHUNK_SIZE, NAMES
from .devices import APPLY_BATCH_SIZE_TEXT, NUM_WORKERS_TEXT, WORKER_TYPES
from .engine.config import TrainConfig
from .data.fields import DEFAULT_LABEL, SEARCH_FIELD
from .errors import GroundingError, InputError

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")


_DEFAULT = " (default: %(default)s)"  # argparse fills in the option's default
_HUB = ", or a Hugging Face Hub repository ORG/NAME[@REVISION]"  # what --checkpoint also takes
_TRAIN_DEFAULTS = TrainConfig()
_PRESETS_TEXT = "; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items())


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="name of the FiftyOne dataset")
    for name in ("phrase_field", "gt_field", "split_field"):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(_TRAIN_DEFAULTS, name),
                       help=TrainConfig.HELP[name] + _DEFAULT)


def _add_distributed_arg(p: argparse.ArgumentParser, then: str = "") -> None:
    p.add_argument("--distributed", action="store_true", help=(
        "run as one rank of `torchrun` or `accelerate launch` (one or many nodes, one shared database: "
        "FIFTYONE_DATABASE_URI, the same media paths): each rank runs its share of the images on its own device "
        "(cuda:LOCAL_RANK)" + then))


def _samples_of_split_args(view, args):
    """The samples of ``--split`` (one or more split names), or all of them."""
    if not args.split:
        return view
    from fiftyone import ViewField as F

    return view.match(F(args.split_field).is_in(args.split))


def _load_view(args):
    import fiftyone as fo

    if not fo.dataset_exists(args.dataset):
        raise InputError(f"no FiftyOne dataset named {args.dataset!r}; existing: {fo.list_datasets()}")
    return fo.load_dataset(args.dataset)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, dataset_name=args.dataset_name, num_images=args.num_images,
             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
             json_path=args.json, overwrite=args.overwrite, progress=not args.no_progress, task=args.task)


def cmd_summary(args) -> None:
    import torch

    from .models.build import build_model

    def build(preset):  # shapes only: every tensor on the meta device, nothing allocated or initialized
        with torch.device("meta"):
            return build_model(preset, weights=False, **overrides)

    overrides = {"image_size": args.image_size, "image_encoder": args.image_encoder,
                 "text_encoder": args.text_encoder}
    if args.preset == "all":
        print(f"{'preset':<14} {'architecture':<12} {'px':>5} {'total params':>14} {'trainable':>12}")
        for preset in PRESETS:
            model = build(preset)
            print(f"{preset:<14} {model.config.architecture:<12} {model.config.image_size:>5} "
                  f"{model.num_parameters():>14,} {model.num_parameters(trainable_only=True):>12,}")
        return
    model = build(args.preset)
    print(f"preset {args.preset!r}: image encoder {model.config.image_encoder}, "
          f"text encoder {model.config.text_encoder}, {model.config.image_size} px")
    for name, module in model.named_children():
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"  {name:<14} {total:>13,} params  {trainable:>12,} trainable")
    print(f"total params:     {model.num_parameters():,}")
    print(f"trainable params: {model.num_parameters(trainable_only=True):,}")


# train's flags: TrainConfig keys; unset flags leave the recipe's value or TrainConfig's default
_TRAIN_FLAGS = ("preset", "out_dir", "epochs", "batch_size", "lr", "weight_decay", "warmup_frac", "grad_clip",
                "augment", "negative_share", "train_split", "val_split", "num_workers", "seed", "mixed_precision")
_MODEL_FLAGS = ("image_size", "image_encoder", "text_encoder")  # overrides of the preset's model config


def train_config_from_args(args) -> TrainConfig:
    """The run's TrainConfig: TrainConfig's defaults, then the recipe, then the flags given."""
    config = TrainConfig.from_json(args.recipe) if args.recipe else TrainConfig()
    options = {k: getattr(args, k) for k in _TRAIN_FLAGS + ("phrase_field", "gt_field", "split_field")
               if getattr(args, k) is not None}
    model = {**config.model, **{k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}}
    return config.merged(**options, model=model)


def cmd_train(args) -> None:
    from .engine.fit import fit

    config = train_config_from_args(args)
    view = _load_view(args)
    result = fit(view, config, resume=not args.no_resume, cpu=args.cpu, progress=not args.no_progress)
    print(f"best checkpoint: {result.best_dir} (score {result.best_val_iou})")


def _checkpoint(args, dataset=None) -> str:
    """``--checkpoint``, else the dataset's latest trained model, else the demo's (absolute paths)."""
    from .app.zoo import NO_DEFAULT_MODEL, default_checkpoint

    if args.checkpoint:
        return args.checkpoint
    found = default_checkpoint(dataset)
    if found is None:
        raise InputError("no --checkpoint given and " + NO_DEFAULT_MODEL[0].lower() + NO_DEFAULT_MODEL[1:])
    print(f"checkpoint: {found}")
    return found


def _rank_and_device(args):
    """(shard, device): this process's rank under ``--distributed`` (else one process) and its device."""
    from .inference.distributed import ONE_PROCESS, launched_shard, rank_device

    shard = launched_shard() if getattr(args, "distributed", False) else ONE_PROCESS
    return shard, rank_device(args.device, shard)


def _ranks_line(run: dict) -> str:
    """``"; ranks: 1,024 + 1,010 samples"`` for a distributed run (the rank that prints it is rank 0)."""
    if "ranks" not in run:
        return ""
    return "; ranks: " + " + ".join(f"{r['processed']:,}" for r in run["ranks"]) + " samples"


def cmd_apply(args) -> None:
    from .inference.apply import apply_grounding_model
    from .inference.model import GroundingModel

    shard, device = _rank_and_device(args)
    view = _samples_of_split_args(_load_view(args), args)
    model = GroundingModel.from_checkpoint(_checkpoint(args, view), device=device)
    run = apply_grounding_model(view, model, label_field=args.label_field, prompt_field=args.phrase_field,
                                batch_size=args.batch_size, num_workers=args.num_workers,
                                worker_type=args.worker_type, skip_existing=args.skip_existing,
                                confidence_thresh=args.confidence_thresh,
                                write_every=getattr(args, "write_every", 1024),  # evaluate --checkpoint has none
                                distributed=shard,
                                progress=False if shard.distributed and shard.rank else None)
    if shard.rank == 0:
        processed = sum(r["processed"] for r in run["ranks"]) if "ranks" in run else run["processed"]
        print(f"wrote {args.label_field!r} on {processed} of {len(view)} samples" + _ranks_line(run)
              + (f"; no box for {len(run['skipped'])} (first: {run['skipped'][:3]})" if run["skipped"] else ""))
    return view


def cmd_search(args) -> None:
    from .fiftyone_api import root_dataset
    from .inference.model import GroundingModel
    from .inference.search import search_phrase

    shard, device = _rank_and_device(args)
    view = _samples_of_split_args(_load_view(args), args)
    model = GroundingModel.from_checkpoint(_checkpoint(args, view), device=device)
    ranked = search_phrase(view, args.phrase, model, label_field=args.label_field, batch_size=args.batch_size,
                           use_cache=not args.no_cache, distributed=shard,
                           progress=False if shard.distributed and shard.rank else None)
    if shard.rank:
        return
    if args.save_view:
        root_dataset(view).save_view(args.save_view, ranked, overwrite=True)
    top = ranked.limit(args.top).values(["filepath", f"{args.label_field}.detections.confidence"])
    print(f"{args.phrase!r}: the {min(args.top, len(view))} most likely of {len(view)} samples "
          f"(boxes in {args.label_field!r}" + (f", view {args.save_view!r}" if args.save_view else "") + "):")
    for path, confidences in zip(*top):
        best = max(confidences) if confidences else None
        print(f"  {best:.3f}  {path}" if best is not None else f"  -      {path}")


def cmd_evaluate(args) -> None:
    from .evaluation.fiftyone_run import evaluate_in_fiftyone
    from .evaluation.tables import format_grec_table, format_table
    from .evaluation.scoring import evaluate_grounding

    view = cmd_apply(args) if args.checkpoint else _samples_of_split_args(_load_view(args), args)
    if args.eval_key:
        result = evaluate_in_fiftyone(view, args.label_field, args.gt_field, eval_key=args.eval_key,
                                      split_field=args.split_field)
        print(format_table(result))
        if "grec" in result:
            print(format_grec_table(result["grec"]))
        per_sample = (f"each sample's F1 in {result['grec']['f1_field']!r}" if "grec" in result
                      else f"each sample's IoU in {result['iou_field']!r}")
        print(f"mAP (IoU 0.50:0.95) {result['mAP'] if result['mAP'] is not None else '-'}; evaluation "
              f"{args.eval_key!r} is in the App's Model Evaluation panel, {per_sample}")
    else:
        result = evaluate_grounding(view, args.label_field, args.gt_field, split_field=args.split_field)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def cmd_label_errors(args) -> None:
    from .qa.label_errors import compute_label_errors

    if args.preset and args.checkpoint:
        raise InputError("give --checkpoint (score with a trained model) or --preset (train fold models), not both")
    if args.preset and args.distributed:
        raise InputError("--distributed scores with a trained model (--checkpoint); --preset trains fold models in "
                         "one process: run it without --distributed, or train a model first and score with it")
    view = _samples_of_split_args(_load_view(args), args)
    if args.preset:
        compute_label_errors(view, preset=args.preset, folds=args.folds, out_dir=args.out_dir,
                             train_options={"epochs": args.epochs}, phrase_field=args.phrase_field,
                             gt_field=args.gt_field, field=args.field, device=args.device,
                             progress=not args.no_progress)
    elif args.distributed:
        _distributed_label_errors(view, args)
    else:
        compute_label_errors(view, model=_checkpoint(args, view), phrase_field=args.phrase_field,
                             gt_field=args.gt_field, field=args.field, device=args.device,
                             progress=not args.no_progress)


def _distributed_label_errors(view, args) -> None:
    """Each rank scores its share of the images; once all are done, rank 0 calibrates the whole view."""
    from .inference.distributed import process_group
    from .qa.label_errors import calibrate_label_errors, score_label_errors

    shard, device = _rank_and_device(args)
    options = dict(phrase_field=args.phrase_field, gt_field=args.gt_field, field=args.field, device=device,
                   progress=not args.no_progress and shard.rank == 0)
    checkpoint = _checkpoint(args, view)
    with process_group(shard) as group:
        part = score_label_errors(view, checkpoint, distributed=shard, **options)
        counts = group.gather(part["scored"])
        if shard.rank == 0:
            ranks = f"{shard.world_size} rank{'s' if shard.world_size > 1 else ''}"
            print(f"scored {' + '.join(f'{n:,}' for n in counts)} annotations on {ranks}; calibrating on rank 0")
            calibrate_label_errors(view, checkpoint, **options)
        group.barrier()  # the others end with rank 0, so the launcher's status is the whole run's


def cmd_migrate_labels(args) -> None:
    from .data.labels import migrate_label_scheme

    changed = migrate_label_scheme(_load_view(args), fields=args.fields, label=args.label)
    for field, count in changed.items():
        print(f"{field}: {count} boxes now labelled {args.label!r}, the phrase in their 'expression' attribute")


def cmd_predict(args) -> None:
    from .inference.predict import predict_and_crop

    out = predict_and_crop(args.image, args.phrase, _checkpoint(args), out_dir=args.out_dir, device=args.device)
    if not out["boxes"]:
        print(f"no box: the model finds nothing that {args.phrase!r} refers to in {args.image}")
        return
    for box in out["boxes"]:
        x0, y0, x1, y1 = box["box_pixels"]
        confidence = f", confidence {box['confidence']:.3f}" if box["confidence"] is not None else ""
        print(f"box (pixels, xyxy): {x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f}{confidence}; crop: {box['crop_path']}")
    print(f"annotated image: {out['annotated_path']}")


def cmd_convert(args) -> None:
    from .models.checkpoint import convert_checkpoint

    out = convert_checkpoint(args.src, args.out_dir, args.preset)  # a CheckpointError ends in main
    print(f"wrote {out} (config.json + model.safetensors); load it with --checkpoint {out}")


def cmd_push_to_hub(args) -> None:
    from .engine.publish import prepare_hub_folder, push_to_hub

    if args.dry_run:
        out = prepare_hub_folder(args.run_dir, args.dry_run, args.repo_id)
        print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))}): what would be pushed to "
              f"{args.repo_id}; nothing was uploaded")
        return
    url = push_to_hub(args.run_dir, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                      commit_message=args.commit_message)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed to {url}; load it with --checkpoint {args.repo_id}{at}")


def cmd_install_plugin(args) -> None:
    from .app.install import install_plugin

    print(install_plugin(force=args.force).message())


def add_import_refcoco_arguments(parser) -> None:
    """Add the ``import-refcoco`` arguments to an ``argparse`` parser."""
    parser.description = (
        "Import a RefCOCO-family dataset into a persistent FiftyOne dataset, one sample per referring "
        "expression: refcoco, refcoco+, refcocog (Hugging Face jxu124/refcoco, refcocoplus, refcocog, "
        "or the original REFER files), grefcoco (gRefCOCO: zero, one or several objects per "
        "expression), refcoco-m (Voxel51/RefCOCO-M, RefCOCO val with pixel-accurate masks) or "
        "refcocox (the three as one training set, minus every training image in any val/test split). "
        "Running it again adds only what is missing, so an interrupted import can simply be restarted."
    )
    parser.add_argument(
        "name",
        nargs="?",
        default="refcoco",
        choices=list(NAMES),
        help="which dataset to import (default: %(default)s)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        metavar="SPLIT",
        help="splits to import: train val testA testB (refcoco, refcoco+, grefcoco), train val test "
        "(refcocog), train refcoco/val refcocog/test ... (refcocox); Hugging Face names (validation, "
        "test) also work for jxu124 copies. Default: all",
    )
    parser.add_argument(
        "--source",
        metavar="PATH",
        help="a local copy of the annotations: a save_to_disk folder of jxu124's dataset "
        "(datasets.load_dataset('jxu124/refcoco').save_to_disk(PATH); refcocoplus, refcocog), a REFER "
        "folder (instances.json + refs(unc).p or refs(umd).p), a gRefCOCO folder (grefs(unc).json + "
        "instances.json), a RefCOCO-M copy (huggingface_hub.snapshot_download of Voxel51/RefCOCO-M), or "
        "for refcocox a folder holding refcoco/, refcoco+/ and refcocog/. Default: load from the Hugging "
        "Face Hub",
    )
    parser.add_argument(
        "--revision",
        metavar="REV",
        help="the Hugging Face Hub revision to load (a branch, tag or commit); default: the tested one "
        "(fiftyone_grounding.sources.base.SOURCE_REVISIONS). Not for refcocox",
    )
    parser.add_argument(
        "--images-dir",
        metavar="DIR",
        help="folder of COCO train2014 images (COCO_train2014_<id>.jpg). Default: fetch only the "
        "needed images through FiftyOne's coco-2014 zoo dataset (refcoco-m ships its images)",
    )
    parser.add_argument(
        "--dataset-name",
        metavar="NAME",
        help="FiftyOne dataset to create or extend (default: the name argument, e.g. refcoco)",
    )
    parser.add_argument(
        "--max-samples", type=int, metavar="N", help="import only the first N expressions, for a quick look"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip expressions whose image is missing (listed in the report) instead of stopping",
    )
    parser.add_argument(
        "--missing-report", metavar="FILE", help="where to write the list of missing image files"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="expressions written per database call; an interruption loses at most one chunk "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers", type=int, metavar="N", help="download threads for the zoo fetch of images"
    )
    parser.add_argument(
        "--ref-l4",
        nargs="?",
        const=True,
        metavar="FOLDER",
        help="after the import, mark the val/test expressions Ref-L4's human review found wrong (fields "
        "ref_l4_caption_quality, ref_l4_wrong; CC BY-NC 4.0, evaluation only): FOLDER holds its "
        "refcocos_annotation_reviewed/*_reviewed.json files; without FOLDER they are downloaded from the "
        "Hugging Face Hub (JierunChen/Ref-L4). refcoco, refcoco+, refcocog, refcocox",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def import_refcoco_from_args(args) -> int:
    """Run ``import_refcoco`` from parsed ``add_import_refcoco_arguments`` arguments; prints a summary,
    returns 0."""
    from .sources.importer import import_refcoco

    if args.revision and args.name == COMBINED:
        raise InputError("--revision names one Hub revision; refcocox loads three (use the Python API's "
                         "revision={variant: ...}).")
    dataset = import_refcoco(
        name=args.name,
        splits=args.splits,
        images_dir=args.images_dir,
        dataset_name=args.dataset_name,
        max_samples=args.max_samples,
        skip_missing=args.skip_missing,
        source=args.source,
        revision=args.revision,
        chunk_size=args.chunk_size,
        missing_report=args.missing_report,
        zoo_kwargs={"num_workers": args.num_workers} if args.num_workers else None,
        progress=False if args.no_progress else None,
        ref_l4=getattr(args, "ref_l4", None),
    )
    record = dataset.info["refcoco"]
    last = record["last_import"]
    counts = dataset.count_values("split")
    per_split = ", ".join(f"{s} {counts[s]}" for s in record["splits"])
    print(f"Dataset {dataset.name!r}: {len(dataset)} expressions ({per_split})")
    print(f"This run added {last['added']}; {last['already_present']} were already present.")
    if "targets" in record:
        t = record["targets"]
        print(f"Targets: {t['one']} expressions refer to one object, {t['several']} to several, {t['none']} to "
              "none (one-box training and evaluation skip the last two kinds)")
    if last.get("skipped_bad_refs"):
        print(f"Skipped {last['skipped_bad_refs']} refs ({last['skipped_bad_ref_expressions']} expressions) whose "
              f"sent_ids disagree with their sentences or repeat, e.g. {last['bad_refs'][0]}")
    if last["missing_images"]:
        print(
            f"Skipped {last['skipped_missing_image']} expressions of {last['missing_images']} missing "
            f"images; list in {last['missing_report']}"
        )
    if getattr(args, "ref_l4", None) and "ref_l4" in dataset.info:
        r = dataset.info["ref_l4"]
        print(f"Ref-L4: {r['matched']} expressions reviewed, {r['wrong']} marked wrong (ref_l4_wrong); "
              f"{r['not_reviewed']} not reviewed; {r['entries_without_sample']} of {r['entries']} reviewed "
              "entries have no sample here")
    return 0


def cmd_import_refcoco(args) -> None:
    import_refcoco_from_args(args)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """train's flags, with TrainConfig's help and defaults. The flags default to None, so that a
    recipe's value stays unless the flag is given; the help states TrainConfig's default."""
    p.add_argument("--dataset", required=True, help="name of the FiftyOne dataset")
    p.add_argument("--recipe", help="JSON file of TrainConfig options (see training/); flags override it")
    types = {"epochs": int, "batch_size": int, "num_workers": int, "seed": int, "lr": float, "weight_decay": float,
             "warmup_frac": float, "grad_clip": float, "negative_share": float}
    choices = {"preset": sorted(PRESETS), "mixed_precision": ["auto", "no", "bf16", "fp16"]}
    for name in _TRAIN_FLAGS + ("phrase_field", "gt_field", "split_field"):
        default = getattr(_TRAIN_DEFAULTS, name)
        if name == "out_dir":
            default = "runs/PRESET"
        elif name == "num_workers":
            default = NUM_WORKERS_TEXT
        elif name == "preset":
            default = f"{default}; {_PRESETS_TEXT}"
        p.add_argument("--" + name.replace("_", "-"), type=types.get(name, str), choices=choices.get(name),
                       help=f"{TrainConfig.HELP[name]} (default: {default})")
    p.add_argument("--image-size", type=int, help="input resolution in pixels (default: the preset's)")
    p.add_argument("--image-encoder", help="vits16 | vits16plus | vitb16 | vitl16, a Hub id or a folder "
                                           "(default: the preset's)")
    p.add_argument("--text-encoder", help="bge-small | bge-base, a Hub id or a folder (default: the preset's)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--no-resume", action="store_true",
                   help="train a new model in OUT_DIR even where it holds a run (by default an unfinished run "
                        "of the same dataset and options goes on; another run there is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiftyone-grounding",
        description="Visual grounding for FiftyOne: find the box a phrase refers to. "
                    "Start with `fiftyone-grounding demo` (offline, CPU, 6-11 minutes).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline main job: synthetic data, train tiny on CPU, apply, evaluate",
                       description="Generate a synthetic referring-expression dataset into FiftyOne, train the "
                                   "'tiny' preset on the CPU, apply it to the test split and print mIoU/Acc.")
    p.add_argument("--task", choices=TASKS, default="rec",
                   help="rec: one box per phrase, the 'tiny' preset; grec: phrases of no, one or several objects, "
                        "'tiny-fusion-multi' against the one-box 'tiny', gRefCOCO's metrics" + _DEFAULT)
    for flag, kind, what in (("--out-dir", str, "images, checkpoints and curves go here"),
                             ("--dataset-name", str, "FiftyOne dataset name"),
                             ("--num-images", int, "synthetic images, 2 expressions each"),
                             ("--epochs", int, "training epochs")):
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, type=kind, help=f"{what} (default: {DEMO_DEFAULTS['rec'][key]}; "
                                             f"grec: {DEMO_DEFAULTS['grec'][key]})")
    p.add_argument("--batch-size", type=int, default=32, help="phrases per step" + _DEFAULT)
    p.add_argument("--lr", type=float, default=7e-4, help="peak learning rate, cosine schedule with warm-up" + _DEFAULT)
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the batch order" + _DEFAULT)
    p.add_argument("--json", help="write the test metrics and the constant-box baseline to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="regenerate the dataset and retrain from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("summary", help="print total and trainable parameters of a preset (no download)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS) + ["all"],
                   help=_PRESETS_TEXT + "; all: one line per preset" + _DEFAULT)
    p.add_argument("--image-size", type=int, help="input resolution in pixels (default: the preset's)")
    p.add_argument("--image-encoder", help="vits16 | vits16plus | vitb16 | vitl16, a Hub id or a folder")
    p.add_argument("--text-encoder", help="bge-small | bge-base, a Hub id or a folder")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train on a FiftyOne dataset",
                       description="Train a grounding model on a FiftyOne dataset with a phrase field and a "
                                   "one-box Detections field. Options come from TrainConfig's defaults, then "
                                   "the recipe, then the flags given. Resumes from OUT_DIR/last when it exists.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    for name, func, text in (("apply", cmd_apply, "write predictions of a checkpoint to a dataset"),
                             ("evaluate", cmd_evaluate, "mIoU / Acc@0.5 / Acc@0.75 and the confidence's metrics, "
                                                        "overall and per split")):
        p = sub.add_parser(name, help=text, description=text + ".")
        _add_data_args(p)
        p.add_argument("--checkpoint", help="checkpoint folder" + _HUB + (
            " (default: the best checkpoint of the latest training run on the dataset, else the demo's)"
            if name == "apply" else "; predictions are made with it first"))
        p.add_argument("--label-field", default="predictions", help="field for (or with) the predictions" + _DEFAULT)
        p.add_argument("--split", nargs="+", metavar="SPLIT", help="only samples of these splits (e.g. testA testB)")
        p.add_argument("--batch-size", type=int, default=None,
                       help=f"phrases per forward pass (default: {APPLY_BATCH_SIZE_TEXT})")
        p.add_argument("--num-workers", type=int, default=None,
                       help=f"workers that decode images ahead of the model (default: {NUM_WORKERS_TEXT})")
        p.add_argument("--worker-type", choices=WORKER_TYPES, default=WORKER_TYPES[0],
                       help="decode in threads (default: nothing to start) or in DataLoader processes")
        p.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when present)")
        p.add_argument("--skip-existing", action="store_true",
                       help="only samples without a prediction in --label-field (finish an interrupted run)")
        p.add_argument("--confidence-thresh", type=float,
                       help="write no box less confident than this (default: write every box)")
        if name == "apply":
            p.add_argument("--write-every", type=int, default=1024, metavar="N",
                           help="write the labels every N samples (a killed run loses at most N)" + _DEFAULT)
            _add_distributed_arg(p, "; with --skip-existing a rerun finishes what a dead rank left")
        if name == "evaluate":
            p.add_argument("--eval-key", help="also record the evaluation as a FiftyOne run of this name "
                                              "(the App's Model Evaluation panel)")
            p.add_argument("--json", help="write the metrics to this JSON file")
        p.set_defaults(func=func)

    text = "find a typed phrase in every image and rank the images by the model's confidence"
    p = sub.add_parser("search", help=text, description=(
        text[0].upper() + text[1:] + ". Each sample's box goes to --label-field; the ranking is printed and, "
        "with --save-view, saved as a view to open in the App."))
    p.add_argument("--dataset", required=True, help="name of the FiftyOne dataset")
    p.add_argument("--split-field", default=_TRAIN_DEFAULTS.split_field, help=TrainConfig.HELP["split_field"] + _DEFAULT)
    p.add_argument("phrase", help='what to find, e.g. "the red car on the left"')
    p.add_argument("--checkpoint", help="checkpoint folder" + _HUB + " (default: the best checkpoint of the latest "
                                        "training run on the dataset, else the demo's)")
    p.add_argument("--label-field", default=SEARCH_FIELD, help="field for the boxes" + _DEFAULT)
    p.add_argument("--split", nargs="+", metavar="SPLIT", help="only samples of these splits")
    p.add_argument("--top", type=int, default=10, help="print the most likely TOP images" + _DEFAULT)
    p.add_argument("--save-view", metavar="NAME", help="save the ranking as the dataset's view NAME")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"phrases per forward pass (default: {APPLY_BATCH_SIZE_TEXT})")
    p.add_argument("--no-cache", action="store_true", help="encode every image, even where training cached its "
                                                         "features for this model")
    p.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when present)")
    _add_distributed_arg(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("migrate-labels", help="convert a dataset's boxes to the label scheme of this version",
                       description="Datasets written before this version label each box with its phrase. "
                                   "This moves the phrase to the box's 'expression' attribute and gives every "
                                   "box one label, as the importers and models now write them. Running it "
                                   "again changes nothing.")
    p.add_argument("--dataset", required=True, help="name of the FiftyOne dataset")
    p.add_argument("--fields", nargs="+", metavar="FIELD", help="Detections fields to convert (default: all)")
    p.add_argument("--label", default=DEFAULT_LABEL, help="the label of every box" + _DEFAULT)
    p.set_defaults(func=cmd_migrate_labels)

    p = sub.add_parser("predict", help="ground one phrase in one image; write the crop and the boxed image",
                       description="Like the notebook's predict_and_crop: prints the box and writes "
                                   "OUT_DIR/<image>_crop.png and OUT_DIR/<image>_box.png.")
    p.add_argument("image", help="image file")
    p.add_argument("phrase", help='referring phrase, e.g. "the small red circle on the left"')
    p.add_argument("--checkpoint", help="checkpoint folder" + _HUB + " (default: the demo's)")
    p.add_argument("--out-dir", default="outputs/predict", help="where the crop and the boxed image go" + _DEFAULT)
    p.add_argument("--device", help="cpu | cuda (default: cuda when present)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert", help="convert a PyTorch .pt/.pth state dict into a safetensors checkpoint",
                       description="Read a state dict with torch.load(weights_only=True), which refuses files "
                                   "that would run code, and write OUT_DIR/config.json + model.safetensors. "
                                   "Only safetensors checkpoints are loaded elsewhere.")
    p.add_argument("src", help="the .pt / .pth / .bin file")
    p.add_argument("out_dir", help="checkpoint folder to write")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the preset the weights were trained with")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push-to-hub", help="upload a trained checkpoint with its model card to the Hugging Face Hub",
                       description="Upload RUN_DIR's best checkpoint (config.json, model.safetensors, calibration.json "
                                   "where it has one) with a model card written from what the run recorded "
                                   "(README.md) to the Hub model repository ORG/NAME, created where missing. Then "
                                   "anyone loads it with --checkpoint ORG/NAME (ORG/NAME@REVISION for a branch, tag "
                                   "or commit), or GroundingModel.from_checkpoint('ORG/NAME').")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's folder (its best/ is pushed) or a checkpoint "
                                                      "folder")
    p.add_argument("repo_id", metavar="ORG/NAME", help="the Hub model repository")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                                                          "its visibility)")
    p.add_argument("--token", help="a Hugging Face token with write access (default: the one `hf auth login` saved, "
                                   "or $HF_TOKEN)")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch, created from main where missing; load "
                                                        "it as ORG/NAME@BRANCH (default: main)")
    p.add_argument("--commit-message", help="the commit's message (default: names the preset and the val IoU)")
    p.add_argument("--dry-run", metavar="OUT_DIR", help="write what would be uploaded into OUT_DIR and upload nothing")
    p.set_defaults(func=cmd_push_to_hub)

    p = sub.add_parser("install-plugin", help="install the App plugin into FiftyOne's plugins folder",
                       description="Link the installed package's plugin folder into FiftyOne's plugins folder "
                                   "(fo.config.plugins_dir, $FIFTYONE_PLUGINS_DIR) as "
                                   "@fiftyone-grounding/grounding, where `fiftyone plugins download` would put "
                                   "it, so the App lists the operators and the panel. Running it again changes "
                                   "nothing; `fiftyone-grounding demo` runs it too.")
    p.add_argument("--force", action="store_true",
                   help="replace a copy of the plugin already there (e.g. from `fiftyone plugins download`)")
    p.set_defaults(func=cmd_install_plugin)

    text = "score each annotation with the probability that it is wrong (label errors)"
    p = sub.add_parser("label-errors", help=text, description=(
        "Score each annotation (phrase + box) with the probability that it is wrong, its likely kind "
        "(wrong_object, bad_box, no_target, ambiguous) and the model's box; tag the likely ones 'suspect'. "
        "Predictions come from models that never trained on the sample: --checkpoint scores only the samples "
        "outside its recorded training view; --preset trains --folds models on image-disjoint folds."))
    _add_data_args(p)
    p.add_argument("--split", nargs="+", metavar="SPLIT", help="only samples of these splits (e.g. val test)")
    p.add_argument("--checkpoint", help="a trained checkpoint folder" + _HUB + " (default: the best checkpoint of "
                                        "the latest training run on the dataset, else the demo's)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="instead: train fold models of this preset")
    p.add_argument("--folds", type=int, default=5, help="with --preset: folds (models trained)" + _DEFAULT)
    p.add_argument("--epochs", type=int, default=10, help="with --preset: epochs per fold" + _DEFAULT)
    p.add_argument("--out-dir", help="with --preset: the fold runs' folder (default: runs/label_errors_FIELD)")
    p.add_argument("--field", default="label_error", help="the score's field (its kind, driver, model box and "
                                                          "review beside it: FIELD_kind, ...)" + _DEFAULT)
    p.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_distributed_arg(p, "; once all are done, rank 0 calibrates the score on the whole view (--checkpoint only)")
    p.set_defaults(func=cmd_label_errors)

    p = sub.add_parser("import-refcoco", help="import RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO / RefCOCO-M / "
                                              "refcocox into FiftyOne")  # (its description: add_import_refcoco_arguments)
    add_import_refcoco_arguments(p)
    p.set_defaults(func=cmd_import_refcoco)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GroundingError as e:  # what the library says of bad input, a missing file, a download: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
