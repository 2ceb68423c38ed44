"""Sharing a trained model: a training run's best checkpoint as a Hugging Face Hub repository,
with a model card written from what the run recorded.

:func:`prepare_hub_folder` writes exactly what would be uploaded: ``config.json``,
``model.safetensors``, ``calibration.json`` where the model has one, and ``README.md``, the model
card (never the optimizer's state of ``last/``, never a pickle). :func:`push_to_hub` writes that
folder and uploads it; anyone then loads the model by the repository's name
(``GroundingModel.from_checkpoint("org/name")``, ``--checkpoint org/name``), see
``models/hub_repo.py``.

The card is built from the run's folder (``train_config.json``, ``run_fingerprint.json``,
``metrics.json``, ``best/info.json``, the checkpoint itself) and, where the training dataset is
in this FiftyOne database, from what FiftyOne recorded there: where the dataset came from, the
size of its splits, and the evaluations of this checkpoint (``runs.py``). The frozen encoders are
named with their licences, not uploaded: the checkpoint holds the trained weights only.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, HubUploadError, InputError
from ..evaluation.metrics import GREC_METRICS, METRICS
from ..evaluation.tables import format_metric
from ..hub import hub_offline, offline_setting
from ..models.calibration import CALIBRATION_NAME, Calibration
from ..models.checkpoint import (BEST_DIR, CONFIG_NAME, HUB_FILES, WEIGHTS_NAME, atomic_write_dir,
                                 resolve_checkpoint_dir)
from ..models.config import PRESET_DESCRIPTIONS, GrounderConfig
from ..models.encoder_specs import TINY_ENCODER_CONFIGS
from ..models.hub_repo import CARD_NAME, HUB_URL, parse_hub_repo
from .report import EXTRA_COLUMNS
from .state import FINGERPRINT_NAME, TRAIN_CONFIG_NAME

logger = logging.getLogger(__name__)

LIBRARY_NAME = "fiftyone-grounding"
PROJECT_URL = "https://github.com/fiftyone-grounding/fiftyone-grounding"
PROJECT_LICENCE = "apache-2.0"  # the code's (fiftyone.yml); what the card says where no encoder asks for more
METRICS_NAME = "metrics.json"
INFO_NAME = "info.json"
# Training options that say where a run wrote and how fast it loaded, not how it trained: left
# out of the card's recipe (and machine-specific).
MACHINE_OPTIONS = ("out_dir", "cache_dir", "num_workers", "cache_budget_gb")


@dataclass(frozen=True)
class Licence:
    """An encoder's licence: its name on the card, its Hub ``license`` identifier, its text."""

    name: str
    hub_id: str
    url: str


DINOV3_LICENCE = Licence("DINOv3 License", "dinov3-license",
                         "https://ai.meta.com/resources/models-and-libraries/dinov3-license/")
MIT_LICENCE = Licence("MIT", "mit", "https://opensource.org/license/mit")
# By Hub id prefix: DINOv3 (facebook/dinov3-*) is under Meta's DINOv3 License and gated on the
# Hub; BGE (BAAI/bge-*) is MIT.
ENCODER_LICENCES = (("facebook/dinov3-", DINOV3_LICENCE), ("BAAI/bge-", MIT_LICENCE))
PERMISSIVE = {"mit", "apache-2.0"}


def encoder_licence(encoder: str) -> Optional[Licence]:
    """The licence of a known encoder (by Hub id), None for others."""
    return next((licence for prefix, licence in ENCODER_LICENCES if encoder.startswith(prefix)), None)


@dataclass
class RunRecords:
    """What a training run recorded about the checkpoint it is published from."""

    checkpoint: Path  # the checkpoint folder (a run's best/)
    config: GrounderConfig
    run_dir: Optional[Path] = None  # None: a checkpoint folder that is not inside a run's folder
    best: dict = field(default_factory=dict)  # best/info.json: its epoch and val IoU
    calibration: Optional[Calibration] = None
    train_config: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    trainable: int = 0  # parameters in model.safetensors
    source: dict = field(default_factory=dict)  # the dataset's info: where it came from
    split_sizes: dict = field(default_factory=dict)  # split -> expressions the run trained or validated on
    evaluations: list = field(default_factory=list)  # FiftyOne evaluations of this checkpoint


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CheckpointError(f"{path} is not valid JSON; write it again or delete it.") from None


def _trainable_parameters(weights: Path) -> int:
    """The number of values in a safetensors file, from its header (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            return sum(_product(f.get_slice(key).get_shape()) for key in f.keys())
    except SafetensorError as e:
        raise CheckpointError(f"{weights} is not a valid safetensors file ({e}); write it again.") from None


def _product(shape) -> int:
    n = 1
    for size in shape:
        n *= int(size)
    return n


def read_run(run_dir) -> RunRecords:
    """The checkpoint that ``run_dir`` means (a run's folder: its ``best/``; a checkpoint folder as
    it is) and what its run recorded (a checkpoint inside a run's folder finds its run)."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"No folder {run_dir}: give a training run's folder (holding {BEST_DIR}/) or a "
                              "checkpoint folder.")
    folder = resolve_checkpoint_dir(path)
    recorded = (folder.parent / TRAIN_CONFIG_NAME).is_file() or (folder.parent / METRICS_NAME).is_file()
    run = folder.parent if recorded else None  # a run's best/ (or last/): the run wrote beside it
    records = RunRecords(checkpoint=folder, config=GrounderConfig.from_json(folder / CONFIG_NAME), run_dir=run,
                         best=_read_json(folder / INFO_NAME) or {},
                         trainable=_trainable_parameters(folder / WEIGHTS_NAME))
    if (folder / CALIBRATION_NAME).is_file():
        records.calibration = Calibration.load(folder)
    if run is not None:
        records.train_config = _read_json(run / TRAIN_CONFIG_NAME) or {}
        records.fingerprint = _read_json(run / FINGERPRINT_NAME) or {}
        records.history = (_read_json(run / METRICS_NAME) or {}).get("history", [])
        _read_fiftyone_records(records)
    return records


def _read_fiftyone_records(records: RunRecords) -> None:
    """Where the training dataset came from, its split sizes and this checkpoint's evaluations,
    from the FiftyOne dataset the run trained on, where this database has it."""
    name = records.fingerprint.get("dataset")
    if not name:
        return
    import fiftyone as fo

    from ..runs import EVALUATE_METHOD, TRAIN_METHOD, training_run_key

    if not fo.dataset_exists(name):
        return
    dataset = fo.load_dataset(name)
    records.source = {key: dataset.info[key] for key in ("refcoco", "synthetic") if key in dataset.info}
    key = training_run_key(records.run_dir)
    cfg = records.train_config
    split_field = cfg.get("split_field", "split")
    if key in dataset.list_runs(method=TRAIN_METHOD):
        view = dataset.load_run_view(key)
        if view.has_field(split_field):
            counts = view.count_values(split_field)
            records.split_sizes = {split: counts.get(split, 0) for split in (cfg.get("train_split"),
                                                                              cfg.get("val_split")) if split}
    ours = {records.checkpoint.resolve(), records.run_dir.resolve()}
    for eval_run in sorted(dataset.list_runs(method=EVALUATE_METHOD)):
        info = dataset.get_run_info(eval_run)
        checkpoint = getattr(info.config, "checkpoint", None)
        if not checkpoint or Path(checkpoint).expanduser().resolve() not in ours:
            continue
        records.evaluations.append({"eval_key": info.config.eval_key, "pred_field": info.config.pred_field,
                                    "samples": len(dataset.load_run_view(eval_run)),
                                    "metrics": dict(info.config.metrics or {})})


# -- the model card ----------------------------------------------------------------------------------


def _encoder_rows(config: GrounderConfig) -> list[tuple[str, str, str]]:
    """(role, encoder, licence) of the two frozen encoders, as Markdown."""
    rows = []
    for role, encoder in (("image", config.image_encoder), ("text", config.text_encoder)):
        licence = encoder_licence(encoder)
        if encoder in TINY_ENCODER_CONFIGS:
            name, terms = f"`{encoder}`", "none: random weights that fiftyone-grounding generates (tests, demo)"
        elif parse_hub_repo(encoder) is not None:
            name = f"[{encoder}]({HUB_URL}/{encoder})"
            terms = f"[{licence.name}]({licence.url})" if licence else f"see [its model card]({HUB_URL}/{encoder})"
        else:
            logger.warning("The %s encoder is the local folder %s: the card says so, but whoever loads this "
                           "checkpoint needs that encoder under the same path", role, encoder)
            name, terms = f"`{encoder}` (a local folder: not on the Hub)", "unknown"
        rows.append((role, name, terms))
    return rows


def _card_data(records: RunRecords):
    """The card's YAML front matter (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    config = records.config
    encoders = [config.image_encoder, config.text_encoder]
    licences = [lic for lic in map(encoder_licence, encoders) if lic is not None and lic.hub_id not in PERMISSIVE]
    # the weights only work on the encoders' features: a restrictive encoder licence (DINOv3's) is named as theirs
    licence = ({"license": "other", "license_name": licences[0].hub_id, "license_link": licences[0].url}
               if licences else {"license": PROJECT_LICENCE})
    base_models = [e for e in encoders if e not in TINY_ENCODER_CONFIGS and parse_hub_repo(e) is not None]
    datasets = sorted(_hub_datasets(records.source))
    return ModelCardData(
        library_name=LIBRARY_NAME, pipeline_tag="zero-shot-object-detection",
        tags=["fiftyone", LIBRARY_NAME, "visual-grounding", "referring-expression-comprehension",
              f"preset-{config.preset}"],
        **licence, **({"base_model": base_models} if base_models else {}),
        **({"datasets": datasets} if datasets else {}))


def _hub_datasets(info) -> set[str]:
    """Every ``hub_id`` a dataset's import record names (a combined import records its parts)."""
    if isinstance(info, dict):
        found = {info["hub_id"]} if isinstance(info.get("hub_id"), str) else set()
        return found.union(*(_hub_datasets(value) for value in info.values()))
    return set()


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(row) + " |" for row in rows])


def _model_section(records: RunRecords) -> str:
    config = records.config
    boxes = (f"zero or more per phrase (up to {config.num_queries}), kept from confidence {config.score_thresh:g}"
             if config.num_queries else "one per phrase")
    rows = [["preset", f"`{config.preset}`" + (f": {PRESET_DESCRIPTIONS[config.preset]}"
                                               if config.preset in PRESET_DESCRIPTIONS else "")],
            ["architecture", f"`{config.architecture}`"], ["image size", f"{config.image_size} px"],
            ["boxes", boxes],
            ["trained parameters", f"{records.trainable:,} (all of `{WEIGHTS_NAME}`; the frozen encoders are "
                                   "not in it)"]]
    if records.calibration is not None:
        c = records.calibration
        ece = f", calibration error there {c.val_ece:.4f}" if c.val_ece is not None else ""
        rows.append(["confidence", f"quality head, `{c.method}` calibration fitted on {c.fitted_on} validation "
                                   f"boxes{ece} (`{CALIBRATION_NAME}`)"])
    encoders = _table(["encoder (frozen)", "model", "licence"], [list(r) for r in _encoder_rows(config)])
    gated = ("\n\nDINOv3 is gated on the Hub: accept its licence on its page and log in (`hf auth login`) before "
             "the first load." if encoder_licence(config.image_encoder) is DINOV3_LICENCE else "")
    return "## Model\n\n" + _table(["", ""], rows) + "\n\n" + encoders + gated


def _data_section(records: RunRecords) -> str:
    if records.run_dir is None:
        return "## Training data\n\nThis checkpoint was published without its training run's folder: not recorded."
    cfg, lines = records.train_config, []
    name = records.fingerprint.get("dataset")
    refcoco, synthetic = records.source.get("refcoco"), records.source.get("synthetic")
    origin = ""
    if refcoco:
        hub = ", ".join(f"[{d}]({HUB_URL}/datasets/{d})" for d in sorted(_hub_datasets(refcoco)))
        origin = f": `{refcoco.get('name', '?')}`" + (f", imported from {hub}" if hub else "")
    elif synthetic:
        origin = (f": the synthetic shapes dataset ({synthetic.get('num_images')} images, seed "
                  f"{synthetic.get('seed')})")
    lines.append(f"- FiftyOne dataset `{name}`{origin}" if name else "- not a FiftyOne dataset (not recorded)")
    stages = records.fingerprint.get("view") or []
    if stages:
        lines.append("- view: " + ", ".join(f"`{_stage_text(s)}`" for s in stages))
    lines.append(f"- phrases from `{cfg.get('phrase_field')}`, boxes from `{cfg.get('gt_field')}`")
    for what, key in (("trained on", "train_split"), ("best checkpoint chosen on", "val_split")):
        split = cfg.get(key)
        if split:
            size = records.split_sizes.get(split)
            lines.append(f"- {what} `{cfg.get('split_field')}` == `{split}`"
                         + (f" ({size:,} expressions)" if size is not None else ""))
        elif key == "train_split":
            lines.append("- trained on the whole view")
    return "## Training data\n\n" + "\n".join(lines)


def _stage_text(stage: dict) -> str:
    name = str(stage.get("_cls", "?")).rsplit(".", 1)[-1]
    kwargs = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in stage.get("kwargs", []) if not k.startswith("_"))
    text = f"{name}({kwargs})"
    return text if len(text) <= 200 else text[:197] + "..."


def _training_section(records: RunRecords, repo_id: str) -> str:
    if not records.train_config:
        return ""
    recipe = {k: v for k, v in records.train_config.items() if k not in MACHINE_OPTIONS}
    dataset = records.fingerprint.get("dataset") or "DATASET"
    return (f"## Training\n\nThe run's options (`{TRAIN_CONFIG_NAME}`, less where it wrote and how fast it "
            f"loaded):\n\n```json\n{json.dumps(recipe, indent=2)}\n```\n\n"
            f"To train it again, save them as `recipe.json` and run\n\n```bash\n"
            f"fiftyone-grounding train --dataset {dataset} --recipe recipe.json --out-dir runs/{repo_id.split('/')[1]}"
            "\n```")


def _evaluation_section(records: RunRecords) -> str:
    parts = []
    if records.history:
        extra = [(key, name) for key, name in EXTRA_COLUMNS if any(key in row for row in records.history)]
        head = ["epoch", "train loss", "train IoU", "val loss", "val IoU"] + [name for _, name in extra]
        best = records.best.get("epoch")
        rows = [[(f"**{row['epoch']}** (best/)" if row.get("epoch") == best else str(row.get("epoch")))]
                + [format_metric(row.get(key)) for key in ("train_loss", "train_iou", "val_loss", "val_iou")]
                + [format_metric(row.get(key)) for key, _ in extra] for row in records.history]
        parts.append("Per epoch, as training reported it (`metrics.json`); the checkpoint is the best epoch's:\n\n"
                     + _table(head, rows))
    if records.evaluations:
        names = dict([("mAP", "mAP")] + [(key, name) for key, name, _ in METRICS + GREC_METRICS])
        keys = [k for k in names if any(e["metrics"].get(k) is not None for e in records.evaluations)]
        rows = [[f"`{e['eval_key']}`", f"`{e['pred_field']}`", str(e["samples"])]
                + [format_metric(e["metrics"].get(k)) for k in keys] for e in records.evaluations]
        parts.append("Evaluations of this checkpoint recorded in FiftyOne (`evaluate_in_fiftyone`):\n\n"
                     + _table(["evaluation", "predictions", "samples"] + [names[k] for k in keys], rows))
    return "## Evaluation\n\n" + ("\n\n".join(parts) if parts else "None recorded with this checkpoint.")


def _use_section(repo_id: str) -> str:
    return (f"## Use\n\nWith [fiftyone-grounding]({PROJECT_URL}) (`pip install \"git+{PROJECT_URL}\"`):\n\n"
            f"```python\nimport fiftyone as fo\nfrom fiftyone_grounding import GroundingModel\n\n"
            f"model = GroundingModel.from_checkpoint(\"{repo_id}\", prompt_field=\"expression\")\n"
            f"dataset = fo.load_dataset(\"my-dataset\")  # one phrase per sample in its \"expression\" field\n"
            f"dataset.apply_model(model, label_field=\"predictions\")\n```\n\n"
            f"On the command line: `fiftyone-grounding apply --dataset my-dataset --checkpoint {repo_id}` "
            f"(`{repo_id}@REVISION` for another branch, tag or commit; `revision=` in Python). The files are "
            "fetched once into the Hugging Face cache; with `HF_HUB_OFFLINE=1` the cached copy is used. "
            f"Only `{CONFIG_NAME}`, `{WEIGHTS_NAME}` and `{CALIBRATION_NAME}` are read: nothing is unpickled.")


def model_card(records: RunRecords, repo_id: str) -> str:
    """The model card (``README.md``) of ``records``' checkpoint as the Hub repository ``repo_id``."""
    config = records.config
    body = [f"# {repo_id}",
            "A visual grounding model for [FiftyOne](https://github.com/voxel51/fiftyone): given an image and a "
            "referring phrase (\"the small red circle on the left\"), it gives the box the phrase refers to, with "
            f"a confidence. Preset `{config.preset}`, frozen `{config.image_encoder}` image and "
            f"`{config.text_encoder}` text encoders, trained with fiftyone-grounding.",
            _use_section(repo_id), _model_section(records), _data_section(records),
            _training_section(records, repo_id), _evaluation_section(records)]
    return f"---\n{_card_data(records).to_yaml()}\n---\n\n" + "\n\n".join(part for part in body if part) + "\n"


# -- the folder and the upload -----------------------------------------------------------------------


def _checked_repo_id(repo_id: str) -> str:
    repo = parse_hub_repo(repo_id)
    if repo is None or repo.revision is not None:
        raise InputError(f"{repo_id!r} is not a Hugging Face Hub model id: give ORG/NAME (letters, digits, '-', "
                         "'_', '.'), and the branch to push to as revision=.")
    return repo.repo_id


def prepare_hub_folder(run_dir, out_dir, repo_id: str) -> Path:
    """Write into ``out_dir`` exactly what :func:`push_to_hub` uploads for ``run_dir`` (a training
    run's folder means its ``best/``; a checkpoint folder is taken as it is): the checkpoint's
    ``config.json``, ``model.safetensors`` and ``calibration.json`` (where it has one), and the
    model card ``README.md``. ``out_dir`` is created, or replaced where it holds such a folder
    already; a folder that holds other files is refused. Returns ``out_dir``."""
    repo_id = _checked_repo_id(repo_id)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(p.name not in HUB_FILES for p in out.iterdir())):
        raise InputError(f"{out} holds other files than a Hub folder's ({', '.join(HUB_FILES)}): give a new or "
                         "empty folder, which is written whole.")
    return _write_hub_folder(read_run(run_dir), out, repo_id)


def _write_hub_folder(records: RunRecords, out: Path, repo_id: str) -> Path:
    card = model_card(records, repo_id)

    def write(tmp: Path) -> None:
        for name in (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME):
            if (records.checkpoint / name).is_file():
                shutil.copyfile(records.checkpoint / name, tmp / name)
        (tmp / CARD_NAME).write_text(card)

    return atomic_write_dir(out, write)


def push_to_hub(run_dir, repo_id: str, private: bool = False, token: Optional[str] = None,
                revision: Optional[str] = None, commit_message: Optional[str] = None) -> str:
    """Upload ``run_dir``'s checkpoint (see :func:`prepare_hub_folder`) with its model card to the
    Hugging Face Hub model repository ``repo_id`` (``org/name``), created where it does not exist
    (``private``: visible to its owner only). ``revision``: the branch to push to, created from
    ``main`` where missing (load it as ``org/name@branch``); ``token``: default the one that
    ``hf auth login`` saved or ``$HF_TOKEN``. A file of an earlier checkpoint that this one lacks
    (a ``calibration.json``) is deleted in the same commit. Returns the repository's URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    repo_id = _checked_repo_id(repo_id)
    offline = hub_offline()  # offline, or no connection: one sentence now, not a minute of retries
    if offline:
        step = "unset HF_HUB_OFFLINE" if offline_setting() else "connect"
        raise HubUploadError(f"Cannot push to the Hugging Face Hub ({offline}): {step} and run it again, or write "
                             "the folder to upload without pushing (prepare_hub_folder; CLI: --dry-run OUT_DIR).")
    records = read_run(run_dir)
    with tempfile.TemporaryDirectory(prefix="fiftyone-grounding-push-") as tmp:
        folder = _write_hub_folder(records, Path(tmp) / "repo", repo_id)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                              commit_message=commit_message or default_commit_message(records),
                              allow_patterns=list(HUB_FILES), delete_patterns=list(HUB_FILES))
        except (HfHubHTTPError, LocalTokenNotFoundError, OSError) as e:
            raise _upload_error(e, repo_id) from None
    return f"{constants.ENDPOINT}/{repo_id}" + (f"/tree/{revision}" if revision else "")


def _upload_error(error: Exception, repo_id: str) -> HubUploadError:
    """An upload's error (no token, refused, the Hub down) as one sentence that says what to do."""
    from huggingface_hub.errors import LocalTokenNotFoundError

    login = "log in with `hf auth login`, set HF_TOKEN or pass token= (CLI: --token)"
    if isinstance(error, LocalTokenNotFoundError):
        return HubUploadError(f"Pushing to the Hugging Face Hub needs a token with write access: {login}.")
    status = getattr(getattr(error, "response", None), "status_code", None)
    detail = " ".join(str(error).split()).replace(". ", "; ")[:200].rstrip(".")
    if status == 401:
        return HubUploadError(f"The Hugging Face Hub refused the token (401): {login} again.")
    if status == 403:
        return HubUploadError(f"The token may not write to {repo_id} (403): use a token with write access to "
                              f"{repo_id.split('/')[0]} ({login}).")
    return HubUploadError(f"Could not push to {repo_id} ({detail}): check the connection and the token, then run "
                          "it again.")


def default_commit_message(records: RunRecords) -> str:
    """The commit message of a push, naming the preset and the best epoch's val IoU."""
    iou = records.best.get("val_iou")
    return (f"Upload a {LIBRARY_NAME} checkpoint ({records.config.preset}"
            + (f", val IoU {iou:.4f}" if isinstance(iou, (int, float)) else "") + ")")

