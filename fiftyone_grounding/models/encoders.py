"""Building and loading the frozen encoders and the tokenizer: the one place that does it.

Encoders load through ``from_pretrained`` from a Hub id or a local folder. The
``tiny:*`` names are the real classes (``DINOv3ViTModel``, ``BertModel``) with small
configs and random weights, generated once into a local folder and then loaded through
the very same ``from_pretrained`` path; they serve the tests and the offline demo. A Hub id
while the Hub cannot be used (``hub.hub_offline``: ``HF_HUB_OFFLINE``, no connection) is read
from the local Hugging Face cache only, so it loads or fails at once instead of after retries.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import string
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import hub
from .encoder_specs import KNOWN_ENCODER_CONFIGS, TINY_ENCODER_CONFIGS
from ..errors import ConfigError, EncoderUnavailableError, InputError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole-word tokens of the tiny tokenizer: the words of the synthetic phrases (other words
# are spelled out in characters). tests/test_synthetic.py checks that every word the
# generator writes is one of them. (A change here is a new tiny text encoder: new weights.)
TINY_WORDS = (
    "at", "blue", "bottom", "circle", "green", "large", "left", "object", "on", "red", "right",
    "small", "square", "the", "top", "triangle", "white", "yellow",
    # relational phrases ("the circle to the left of the blue square")
    "above", "below", "of", "to",
    # phrases of several objects or none ("all the red shapes", "the two squares", "every small circle")
    "all", "both", "circles", "every", "objects", "shapes", "squares", "three", "triangles", "two",
)


def home_dir() -> Path:
    """Where fiftyone-grounding keeps generated encoders and caches."""
    return Path(os.environ.get("FIFTYONE_GROUNDING_HOME", Path.home() / ".cache" / "fiftyone_grounding"))


def transformers_major() -> int:
    """The installed transformers' major version: DINOv3's module layout and its
    ``hidden_states`` convention changed from 4.x to 5.x (see :func:`dinov3_taps`)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def _model_classes(model_type: str):
    from transformers import BertConfig, BertModel, DINOv3ViTConfig, DINOv3ViTModel

    return {
        "dinov3_vit": (DINOv3ViTConfig, DINOv3ViTModel),
        "bert": (BertConfig, BertModel),
    }[model_type]


def _config_from_dict(values: dict):
    values = dict(values)
    config_cls, _ = _model_classes(values.pop("model_type"))
    return config_cls(**values)


def tiny_encoder_dir(name: str) -> Path:
    """The local folder of a ``tiny:*`` encoder, generated on first use. Its name carries a
    digest of the config, the vocabulary and the transformers major version (4.x and 5.x draw
    different random weights from the same seed; each loads the other's folder, but a folder
    must name one set of weights), so a changed definition is generated anew."""
    if name not in TINY_ENCODER_CONFIGS:
        raise InputError(f"Unknown tiny encoder {name!r}; known: {sorted(TINY_ENCODER_CONFIGS)}")
    definition = json.dumps([TINY_ENCODER_CONFIGS[name], tiny_vocabulary(), transformers_major()], sort_keys=True)
    digest = hashlib.sha256(definition.encode()).hexdigest()[:8]
    path = home_dir() / "encoders" / f"{name.replace(':', '-')}-{digest}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # One writer at a time: several processes (torchrun ranks, DataLoader workers) may
        # ask for the same tiny encoder on first use.
        with open(path.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "config.json").exists():
                _write_tiny_encoder(name, path)
    return path


def tiny_vocabulary() -> list[str]:
    """WordPiece vocab of the tiny tokenizer: special tokens, characters, then ``TINY_WORDS``."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted(set(TINY_WORDS) - set(chars))
    return SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + words


def _write_tiny_encoder(name: str, path: Path) -> None:
    config = dict(TINY_ENCODER_CONFIGS[name])
    _quiet_transformers()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if config["model_type"] == "bert":
        from transformers import BertTokenizerFast

        vocab = tiny_vocabulary()
        config["vocab_size"] = len(vocab)
        vocab_file = tmp / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        # transformers 5 names the argument `vocab`, 4.x `vocab_file`.
        params = inspect.signature(BertTokenizerFast.__init__).parameters
        vocab_arg = {"vocab_file" if "vocab_file" in params else "vocab": str(vocab_file)}
        tokenizer = BertTokenizerFast(**vocab_arg, do_lower_case=True,
                                      model_max_length=config["max_position_embeddings"])
        if tokenizer.tokenize(vocab[-1]) != [vocab[-1]]:
            raise EncoderUnavailableError("The tiny tokenizer did not take its vocabulary; "
                                          "check that the installed transformers is >= 4.56")
        tokenizer.save_pretrained(tmp)
    _, model_cls = _model_classes(config["model_type"])
    # Fixed seed: the same tiny encoder on every machine that generates it; made on the CPU
    # whatever default device the caller set (a summary builds on the meta device)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(0)
        model = model_cls(_config_from_dict(config))
    # The config and the weights written file by file: under torch.distributed, transformers 5's
    # save_pretrained writes only on rank 0, and the process generating may be another rank (it
    # would leave an empty folder behind for every process to fail on).
    from safetensors.torch import save_file

    # the dtype save_pretrained records ("dtype" in transformers 5, "torch_dtype" in 4.x)
    setattr(model.config, "dtype" if "dtype" in model.config.to_dict() else "torch_dtype", torch.float32)
    model.config.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    if not (tmp / "config.json").is_file():
        raise EncoderUnavailableError(f"Could not write the tiny encoder {name!r} into {tmp}")
    os.replace(tmp, path)


def resolve_encoder_path(name: str) -> str:
    """Hub id or local folder that ``from_pretrained`` receives for ``name``."""
    if name.startswith("tiny:"):
        return str(tiny_encoder_dir(name))
    return name


def _hub_offline(path: str) -> Optional[str]:
    """Why the Hub cannot serve ``path`` now (see ``hub.hub_offline``), or None: always None for a
    local folder (``tiny:*`` names included) or anything that is not a Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(path):
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return hub.hub_offline()


def _from_pretrained(cls, path: str, offline: Optional[str], **kwargs):
    """``cls.from_pretrained``; only the local Hugging Face cache when the Hub cannot be used
    (``offline``), so a cached model still loads and a missing one fails at once, not after a
    minute of retries."""
    return cls.from_pretrained(path, **kwargs, **({"local_files_only": True} if offline else {}))


def _unavailable(name: str, what: str, error: Exception, offline: Optional[str] = None) -> EncoderUnavailableError:
    """One line that says why ``name`` did not load and what to do; ``offline``: why the Hub
    could not be used (then the library's message, about its cache, adds nothing)."""
    gated = (f"DINOv3 is gated, so accept its licence on https://huggingface.co/{name} and run "
             "`hf auth login`" + (" when online" if offline else ""))
    elsewhere = (f"download it elsewhere (`hf download {name} --local-dir DIR`) and pass the local folder DIR "
                 "instead of the id")
    if "custom code" in str(error):
        hint = (f"{name!r} asks for custom code (an auto_map in its config.json), which fiftyone-grounding "
                "never runs; give the folder or Hub id of a standard DINOv3 or BERT model")
    elif os.path.isdir(name):
        hint = f"the folder {name!r} does not hold a complete {what} (config.json and model.safetensors)"
    elif offline:
        todo = f"{gated}, or {elsewhere}" if "dinov3" in name.lower() else elsewhere
        return EncoderUnavailableError(
            f"Cannot load the {what}: the Hugging Face Hub cannot be reached ({offline}) and {name!r} is not in "
            f"the local Hugging Face cache; {todo}."
        )
    elif "dinov3" in name.lower():
        hint = f"{name!r} could not be downloaded: {gated}, or, offline, {elsewhere}"
    else:
        hint = f"{name!r} could not be downloaded: check the id and your connection, or, offline, {elsewhere}"
    detail = " ".join(str(error).split())  # transformers' messages span lines; ours is one
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return EncoderUnavailableError(f"Cannot load the {what}: {hint}. ({type(error).__name__}: {detail})")


def _quiet_transformers() -> None:
    """No per-shard progress bars from transformers: ours say what is going on."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def freeze(module: nn.Module) -> nn.Module:
    """Frozen encoder: no gradients, eval mode (no dropout)."""
    module.requires_grad_(False)
    module.eval()
    return module


def load_encoder(name: str, weights: bool = True, what: str = "encoder") -> nn.Module:
    """A frozen encoder: pretrained weights when ``weights``, else random weights.

    ``weights=False`` needs no download for the ids in ``KNOWN_ENCODER_CONFIGS``
    (parameter counts, timing); otherwise the config is read from the folder or Hub.
    """
    path = resolve_encoder_path(name)
    _quiet_transformers()
    offline = None
    try:
        if weights:
            from transformers import AutoModel

            # safetensors only (a pickled pytorch_model.bin is never opened), and no custom code
            # (without trust_remote_code=False, transformers asks on stdin whether to run it)
            offline = _hub_offline(path)
            model = _from_pretrained(AutoModel, path, offline, use_safetensors=True, trust_remote_code=False)
        else:
            if name in KNOWN_ENCODER_CONFIGS:
                config = _config_from_dict(KNOWN_ENCODER_CONFIGS[name])
            else:
                from transformers import AutoConfig

                offline = _hub_offline(path)
                config = _from_pretrained(AutoConfig, path, offline, trust_remote_code=False)
            _, model_cls = _model_classes(config.model_type)
            model = model_cls(config)
    except (OSError, ValueError) as e:
        raise _unavailable(name, what, e, offline) from e
    return freeze(model)


def load_tokenizer(name: str):
    """The tokenizer that goes with the text encoder ``name``."""
    from transformers import AutoTokenizer

    path = resolve_encoder_path(name)
    offline = _hub_offline(path)
    try:
        return _from_pretrained(AutoTokenizer, path, offline, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _unavailable(name, "tokenizer", e, offline) from e


def num_prefix_tokens(image_encoder: nn.Module) -> int:
    """Tokens before the patch grid in the image encoder's output (CLS + registers)."""
    return 1 + int(getattr(image_encoder.config, "num_register_tokens", 0) or 0)


def encoder_hidden_size(encoder: nn.Module) -> int:
    return int(encoder.config.hidden_size)


def patch_size(image_encoder: nn.Module) -> int:
    return int(image_encoder.config.patch_size)


# -- DINOv3's internals: the one place that knows them ------------------------------------------
# transformers 4.x: DINOv3ViTModel children (embeddings, rope_embeddings, layer, norm), and the last
# of ``hidden_states`` is after the final norm. 5.x: (embeddings, rope_embeddings, model, norm) with
# the blocks at ``model.layer``, and the last of ``hidden_states`` is before the final norm. Both call
# a block as ``block(hidden, position_embeddings=(cos, sin))`` and the RoPE as ``rope_embeddings(pixels)``.


def dinov3_blocks(image_encoder: nn.Module) -> nn.ModuleList:
    """DINOv3's transformer blocks, in order: ``layer`` in transformers 4.x, ``model.layer`` in 5.x."""
    inner = getattr(image_encoder, "model", image_encoder)
    blocks = getattr(inner, "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"The image encoder ({type(image_encoder).__name__}) has no DINOv3 blocks "
                          "(neither .layer nor .model.layer): give a DINOv3ViTModel")
    return blocks


def dinov3_embed(image_encoder: nn.Module, pixel_values: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(I, 3, S, S) -> the tokens the first block reads (I, N, D) (CLS, registers, patches) and
    the RoPE (cos, sin) of the patches, as DINOv3ViTModel.forward computes them."""
    pixel_values = pixel_values.to(image_encoder.embeddings.patch_embeddings.weight.dtype)
    return image_encoder.embeddings(pixel_values), image_encoder.rope_embeddings(pixel_values)


def dinov3_taps(image_encoder: nn.Module, pixel_values: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """(I, 3, S, S) -> the outputs of the 1-based blocks ``layers`` ((I, N, D) each; 0: the
    embeddings), before the final norm, on every transformers version.

    Computed block by block rather than read from ``output_hidden_states``, whose last entry is
    normed in 4.x and not in 5.x: these are 5.x's ``hidden_states[i]`` (what the fusion
    checkpoints were trained on), and no block past the last tap runs.
    """
    blocks = dinov3_blocks(image_encoder)
    if not layers or any(not 0 <= i <= len(blocks) for i in layers):
        raise ConfigError(f"DINOv3 layers {list(layers)} must be between 0 and the encoder's {len(blocks)} blocks")
    hidden, rope = dinov3_embed(image_encoder, pixel_values)
    taps = {0: hidden}
    for i, block in enumerate(blocks[:max(layers)], start=1):
        hidden = block(hidden, position_embeddings=rope)
        if i in layers:  # only the taps asked for stay in memory
            taps[i] = hidden
    return [taps[i] for i in layers]
