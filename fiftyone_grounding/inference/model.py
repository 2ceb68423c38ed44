"""``GroundingModel``: a trained grounding network as a FiftyOne model.

``dataset.apply_model(model, label_field="pred", prompt_field="expression", batch_size=32)``
batches for real (``SupportsGetItem`` + ``TorchModelMixin`` with a collate function:
FiftyOne drops ``batch_size`` to 1 for ``ragged_batches=True`` models), reads each
sample's OWN phrase inside the data loader item (so it cannot drift to another sample),
and writes no prediction where the phrase is missing or empty or the image unreadable.

The phrase source can also be set when the model is loaded, so that ``apply_model`` needs no
other argument (FiftyOne's "Apply zoo model" operator passes none):
``GroundingModel.from_checkpoint(path, prompt_field="expression")`` (each sample's own phrase)
or ``prompt="the red car"`` (one phrase for every sample). ``apply_model(prompt_field=...)``
wins over both.

The frozen image encoder also serves FiftyOne's embeddings (``dataset.compute_embeddings(model)``,
and FiftyOne Brain's ``compute_similarity`` / ``compute_visualization`` / ``compute_uniqueness``
with ``model=model``), which need no phrase: :meth:`GroundingModel.embed_all`.

Every path that predicts boxes goes through :meth:`GroundingModel.predict_boxes`; the
faster path over whole datasets is ``apply.apply_grounding_model``. This module is FiftyOne's
model interface; the data loaders' items are in ``items.py`` and ``get_item.py``, tokenization in
``phrases.py``, the copies to and from the GPU in ``transfer.py`` and post-processing in ``postprocess.py``.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import fiftyone.core.models as fom

from ..models.checkpoint import load_checkpoint, resolve_checkpoint_dir
from ..data.fields import DEFAULT_LABEL
from ..fiftyone_api import fiftyone_is_embedding
from ..devices import resolve_device
from ..errors import ImageError, InputError
from ..data.images import normalize_pixels_batch, resize_rgb, rgb_tensor
from ..data.labels import LabelMaker
from ..models.decoder import Grounder
from ..models.precision import autocast, default_mixed_precision
from ..data.skips import count_by_reason
from ..data.text import clean_phrase
from .items import PROMPT_KEY, collate_items
from .phrases import phrase_tokenizer, tokenize_distinct
from .postprocess import BoxPrediction, PostProcess, batch_labels
from .transfer import Pending, copy_to_host, to_device

logger = logging.getLogger(__name__)


def log_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """One warning that counts the samples that got no prediction, by reason."""
    if not skipped:
        return
    logger.warning("No prediction for %d samples: %s", len(skipped), count_by_reason(skipped))


def phrase_source(prompt_field: Optional[str] = None, prompt: Optional[str] = None) -> tuple:
    """``(prompt_field, prompt)`` checked: at most one of them, no empty ones."""
    if prompt_field is not None and prompt is not None:
        raise InputError("Give prompt_field (each sample's own phrase) or prompt (one phrase for every sample), "
                         "not both.")
    if prompt_field is not None and (not isinstance(prompt_field, str) or not prompt_field.strip()):
        raise InputError(f"prompt_field must name the sample field with the phrases, got {prompt_field!r}.")
    if prompt is not None and clean_phrase(prompt) is None:
        raise InputError("The prompt is empty: type the phrase to find, e.g. prompt='the red car'.")
    return (prompt_field.strip() if prompt_field else None), clean_phrase(prompt)


EMBEDDINGS = ("cls", "mean")  # the image embeddings GroundingModel makes (see its `embedding` argument)


def embedding_kind(embedding: str) -> str:
    """``embedding`` checked: one of :data:`EMBEDDINGS`."""
    if embedding not in EMBEDDINGS:
        raise InputError(f"embedding must be 'cls' (the frozen image encoder's CLS token) or 'mean' (the mean of "
                         f"its patch tokens), got {embedding!r}.")
    return embedding


class GroundingModel(fom.Model, fom.EmbeddingsMixin, fom.SupportsGetItem, fom.TorchModelMixin):
    """A trained grounding network wrapped for ``apply_model``, ``compute_embeddings`` and the model zoo."""

    def __init__(self, model: Grounder, device: Optional[Union[str, torch.device]] = None,
                 mixed_precision: str = "auto", label: str = DEFAULT_LABEL,
                 confidence_thresh: Optional[float] = None, score_thresh: Optional[float] = None,
                 prompt_field: Optional[str] = None, prompt: Optional[str] = None, source: Optional[str] = None,
                 embedding: str = "cls", embedding_cache: bool = True):
        """``label``: the label of every box (the phrase goes to its ``expression`` attribute);
        ``confidence_thresh``: boxes less confident than this are not written (as FiftyOne's
        ``apply_model(confidence_thresh=...)``, which also works); ``score_thresh``: a multi-box
        model's boxes are kept from this confidence (default: its config's, 0.7, the official
        gRefCOCO scorer's); lower it to sweep the threshold in evaluation. ``prompt_field`` (each
        sample's phrase) or ``prompt`` (one phrase for all): the phrases ``apply_model`` grounds
        when it is given no ``prompt_field``; ``source``: the checkpoint folder or zoo name the
        network came from (recorded with the fields it writes); ``embedding``: the image embedding
        of ``compute_embeddings`` and FiftyOne Brain, ``"cls"`` or ``"mean"`` (:meth:`embed_all`);
        ``embedding_cache``: read it from the training feature cache where it is there."""
        self._device = resolve_device(device)
        self.model = model.to(self._device).eval()
        self.config = model.config
        self.tokenize = phrase_tokenizer(model.config)
        self._preprocess = True
        if mixed_precision == "auto":
            mixed_precision = default_mixed_precision(self._device)
        self.autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
        self.score_thresh = model.config.score_thresh if score_thresh is None else float(score_thresh)
        self.source = str(source) if source is not None else None
        self.embedding = embedding_kind(embedding)
        self.use_embedding_cache = bool(embedding_cache)
        self._embeddings: Optional[np.ndarray] = None  # those of the last embed / embed_all call
        self._set_options(label=label, confidence_thresh=confidence_thresh, prompt_field=prompt_field, prompt=prompt)

    def _set_options(self, label: str, confidence_thresh: Optional[float], prompt_field: Optional[str],
                     prompt: Optional[str]) -> None:
        self.labels = LabelMaker(label=label, confidence_thresh=confidence_thresh)
        self.prompt_field, self.prompt = phrase_source(prompt_field, prompt)
        self._run_skips: list[tuple[str, str]] = []  # what an apply_model run skipped, logged at its end

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, device=None, revision: Optional[str] = None, **kwargs) -> "GroundingModel":
        """Load a checkpoint folder (``config.json`` + ``model.safetensors``), a training run's
        folder (its ``best/``), or a Hugging Face Hub repository (``"org/name"``, at ``revision``:
        a branch, tag or commit; ``"org/name@revision"`` also works), fetched into the Hugging
        Face cache once. ``kwargs``: the options of ``GroundingModel``, e.g.
        ``prompt_field="expression"`` or ``prompt="the red car"``. The model's ``source`` is the
        folder, or ``org/name[@revision]`` for a repository (not its place in the cache)."""
        from ..models.checkpoint import hub_checkpoint

        repo = hub_checkpoint(path, revision)
        folder = resolve_checkpoint_dir(path, revision=revision)
        kwargs.setdefault("source", str(repo) if repo is not None else str(folder))
        return cls(load_checkpoint(folder), device=device, **kwargs)

    def with_options(self, **options) -> "GroundingModel":
        """A model that shares this one's network and tokenizer (nothing is loaded again) with
        other options: ``prompt_field``, ``prompt``, ``confidence_thresh``, ``score_thresh``,
        ``label``, ``source``, ``embedding``, ``embedding_cache``; those not given keep this model's values."""
        unknown = sorted(set(options) - {"prompt_field", "prompt", "confidence_thresh", "score_thresh", "label",
                                         "source", "embedding", "embedding_cache"})
        if unknown:
            raise InputError(f"Unknown GroundingModel options {unknown}: use prompt_field, prompt, confidence_thresh, "
                             f"score_thresh, label, source, embedding or embedding_cache.")
        current = {"label": self.labels.label, "confidence_thresh": self.labels.confidence_thresh,
                   "prompt_field": self.prompt_field, "prompt": self.prompt}
        if "prompt_field" in options or "prompt" in options:  # a new phrase source replaces the old one
            current.update(prompt_field=None, prompt=None)
        clone = copy.copy(self)
        score_thresh = options.pop("score_thresh", None)
        if score_thresh is not None:
            clone.score_thresh = float(score_thresh)
        source = options.pop("source", self.source)
        clone.source = str(source) if source is not None else None
        clone.embedding = embedding_kind(options.pop("embedding", self.embedding))
        clone.use_embedding_cache = bool(options.pop("embedding_cache", self.use_embedding_cache))
        clone._embeddings = None
        clone._set_options(**{**current, **options})
        return clone

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def applied_score_thresh(self) -> Optional[float]:
        """The score threshold this model applies before it writes boxes: a multi-box model's
        ``score_thresh`` (no box below it is written), None for a one-box model (its box is
        written whatever its confidence). Recorded with the fields it writes (``runs.py``)."""
        return self.score_thresh if self.config.num_queries > 0 else None

    # -- FiftyOne Model interface --------------------------------------------------------

    @property
    def media_type(self):
        return "image"

    @property
    def has_logits(self):
        return False

    @property
    def has_embeddings(self):
        return True  # the frozen image encoder's (embed_all)

    @property
    def ragged_batches(self):
        return False  # every image is resized to the same square: batches stack

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self):
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value):
        self._preprocess = value

    @property
    def has_collate_fn(self):
        return True

    @staticmethod
    def collate_fn(batch):
        return collate_items(batch)

    def build_get_item(self, field_mapping=None):
        """The data loader's item: ``apply_model(prompt_field=...)`` wins, then the load-time
        ``prompt_field``, then the load-time ``prompt``. For ``compute_embeddings`` (FiftyOne Brain
        too) the item is the image alone, whatever the phrase source: no phrase is asked for."""
        from .get_item import GroundingGetItem

        mapping = dict(field_mapping or {})
        if fiftyone_is_embedding():  # FiftyOne passes no phrase source to an embedding run
            mapping.pop(PROMPT_KEY, None)
            # The same loading as predictions (or the feature cache's tokens); an empty phrase for
            # every sample, which embed_all never reads.
            return GroundingGetItem(self.config.image_size, field_mapping=mapping, prompt="",
                                    features=self.embedding_cache())
        if PROMPT_KEY not in mapping and self.prompt_field is not None:
            mapping[PROMPT_KEY] = self.prompt_field
        if PROMPT_KEY not in mapping and self.prompt is None:
            raise InputError("This grounding model has no phrases to find: pass apply_model(..., "
                             "prompt_field='expression'), or load it with prompt_field=... or prompt='...'.")
        prompt = None if PROMPT_KEY in mapping else self.prompt
        return GroundingGetItem(self.config.image_size, field_mapping=mapping, prompt=prompt)

    def __enter__(self):
        self._run_skips = []
        self.tokenize.warned = False  # one warning about cut phrases per run
        return self

    def __exit__(self, *args):
        log_skipped(self._run_skips)
        self._run_skips = []
        return False

    def predict(self, arg, phrase: Optional[str] = None):
        """One image (uint8 HWC array or PIL image) and its phrase (default: the load-time
        ``prompt``) -> ``Detections`` (None for an empty phrase)."""
        if isinstance(arg, dict):
            return self.predict_all([arg])[0]
        if phrase is None:
            phrase = self.prompt
        if phrase is None:
            raise InputError("GroundingModel.predict needs a phrase: predict(image, phrase)")
        item = {"id": None, "filepath": "<array>", "phrase": clean_phrase(phrase), "error": None}
        if item["phrase"] is None:
            return None
        item["pixel_values"] = self.resized(arg)
        return self.predict_all([item])[0]

    def predict_all(self, args, samples=None):
        """Labels of a batch of get-item items (or their collated batch); None where skipped."""
        batch = args if isinstance(args, dict) else collate_items(list(args))
        self._run_skips.extend(batch["errors"])
        prediction = None
        if batch["valid"]:
            prediction = self.predict_boxes(batch["pixel_values"], batch["phrases"], batch["image_index"],
                                            image_features=batch["image_features"]).result()
        return batch_labels(batch, prediction, self.labels.detections)

    @torch.inference_mode()
    def predict_boxes(self, pixel_values: Optional[torch.Tensor], phrases: Sequence[str],
                      image_index: Optional[torch.Tensor] = None,
                      image_features: Optional[torch.Tensor] = None) -> Pending[BoxPrediction]:
        """Queue the boxes of ``phrases`` over images: resized uint8 (I, S, S, 3), or model
        input (I, 3, S, S) already normalized, or (with ``pixel_values=None``) the frozen image
        features of a feature cache, ``image_features`` (I, N, D); ``image_index`` (B,) maps
        each phrase to its image (default: phrase i -> image i). A phrase that several images
        share is encoded once. On a GPU this returns once the work is queued, so the caller
        can prepare the next batch or write the last one's labels meanwhile; ``.result()``
        waits for the (B, 4) boxes on the CPU and their confidences (the calibrated quality
        head; None for a model without one)."""
        text = tokenize_distinct(self.tokenize, phrases)
        if pixel_values is not None:
            pixel_values = self.model_input(pixel_values)
        if image_features is not None:
            image_features = to_device(image_features, self._device)
        ids, mask = to_device(text.input_ids, self._device), to_device(text.attention_mask, self._device)
        if image_index is not None:
            image_index = to_device(image_index, self._device)
        with autocast(self._device, self.autocast_dtype):
            text_features = None
            if text.order is not None:  # e.g. one searched phrase over every image: its text encoded once
                order = to_device(text.order, self._device)  # (B,)
                text_features = self.model.encode_text(ids, mask).index_select(0, order)  # (B, T, D_txt)
                ids, mask = None, mask.index_select(0, order)
            out = self.model(pixel_values, ids, mask, image_index, image_features=image_features,
                             text_features=text_features)
        postprocess = PostProcess(self.model.calibration, self.score_thresh)
        return copy_to_host(postprocess.pack(out), postprocess)  # one copy of boxes and confidences

    def resized(self, image) -> torch.Tensor:
        """One image (uint8 HWC array or PIL image) -> (S, S, 3) uint8, resized as the data
        loaders' items are (``predict`` and ``embed`` take images through it)."""
        image = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        return rgb_tensor(resize_rgb(image, self.config.image_size))

    def model_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Resized uint8 images (I, S, S, 3), or model input (I, 3, S, S) already normalized ->
        model input on the model's device: the one normalization of predictions and embeddings."""
        pixel_values = to_device(pixel_values, self._device)
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels_batch(pixel_values, self.config.image_mean, self.config.image_std)
        return pixel_values

    # -- embeddings (FiftyOne's EmbeddingsMixin) ---------------------------------------------

    def embed(self, arg) -> np.ndarray:
        """One image (uint8 HWC array or PIL image) or get-item item -> its (D,) embedding."""
        return self.embed_all([arg])[0]

    def embed_all(self, args) -> np.ndarray:
        """(B, D) float32 image embeddings of get-item items, of their collated batch (what
        ``compute_embeddings`` passes), or of images (uint8 HWC arrays or PIL images), each
        resized and normalized as for predictions; no phrase is read.

        D is the frozen image encoder's width: its output tokens after its final norm, before any
        of the grounding network's projections (the adapter architecture's adapters do not run).
        ``embedding="cls"`` (the default) takes their CLS token, ``"mean"`` the mean of the patch
        tokens (CLS and registers left out). CLS by default because it is DINOv3's global image
        descriptor: the image-level (DINO) objective trains it, and the authors' model cards and
        transformers' ``pooler_output`` give it as the image embedding; the patch tokens are
        trained for dense work.

        L2-normalized: FiftyOne Brain's similarity indexes compare by cosine by default (which
        normalizing leaves unchanged), but some backends by dot product (Milvus), and its
        visualizations (PCA, t-SNE, UMAP) by Euclidean distance; on unit vectors every one of them
        ranks as cosine does. The raw tokens: ``model.model.image_encoder``.

        Read from the training feature cache where it holds the image (:meth:`embedding_cache`):
        the decoder architectures' cache (seed, grounder, tiny) holds exactly the encoder's final
        tokens, in float16, so the embedding is the encoded one to float16 rounding (about 1e-4
        on the unit vector) without decoding or encoding the image. The fusion architecture's
        cache holds its tapped layers before DINOv3's final norm, the adapter has none: those
        encode.

        An unreadable image fails its batch (FiftyOne then writes no embedding for that batch's
        samples and goes on, as with its own models)."""
        if isinstance(args, dict):
            batch = args
        else:
            batch = collate_items([a if isinstance(a, dict) else
                                   {"id": None, "filepath": f"<array {i}>", "phrase": "", "error": None,
                                    "pixel_values": self.resized(a)} for i, a in enumerate(args)])
        if batch["errors"]:
            raise ImageError(f"No embeddings for this batch of {batch['size']} samples: "
                             f"{count_by_reason(batch['errors'])}")
        parts = []  # pixels first, then cached features: the order of the batch's image numbers
        if batch["pixel_values"] is not None:
            parts.append(self.embed_pixels(batch["pixel_values"]))
        if batch["image_features"] is not None:
            parts.append(self.pool(batch["image_features"]))
        if not parts:
            raise InputError("GroundingModel.embed_all takes images (at least one).")
        images = torch.cat(parts).numpy()  # (I, D)
        self._embeddings = images[batch["image_index"].numpy()]  # (B, D): samples that share an image share its row
        return self._embeddings

    def get_embeddings(self) -> np.ndarray:
        """The (B, D) embeddings of the last :meth:`embed` / :meth:`embed_all` call (predictions
        make none: the grounding network keeps no image embedding)."""
        if self._embeddings is None:
            raise InputError("This model has made no embeddings yet: call embed(image) or embed_all(images) first.")
        return self._embeddings

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Resized uint8 images (I, S, S, 3), or model input (I, 3, S, S) -> (I, D) embeddings
        on the CPU, float32, L2-normalized (see :meth:`embed_all`)."""
        with autocast(self._device, self.autocast_dtype):
            tokens = self.model.image_encoder(pixel_values=self.model_input(pixel_values)).last_hidden_state
        return self.pool(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image encoder's final tokens (I, N, D) (CLS, registers, patches) -> (I, D) embeddings
        on the CPU, float32, L2-normalized: the CLS token or the mean of the patches."""
        tokens = tokens.float()
        pooled = tokens[:, 0] if self.embedding == "cls" else tokens[:, self.model.num_prefix:].mean(1)  # (I, D)
        return F.normalize(pooled, dim=-1).cpu()

    def embedding_cache(self):
        """The training feature cache of this network when it holds the image encoder's final
        tokens (``feature_spec() is None``: the decoder architectures) and ``embedding_cache`` is
        on, else None: the images an embedding run finds there are read from it."""
        if not self.use_embedding_cache or not self.model.cacheable or self.model.feature_spec() is not None:
            return None
        from ..data.cache import default_feature_cache_dir, find_feature_cache

        return find_feature_cache(default_feature_cache_dir(), self.model)
