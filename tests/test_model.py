"""The model: exact seed size, every preset builds, frozen encoders, grouping, checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from fiftyone_grounding.models.checkpoint import load_checkpoint, save_checkpoint
from fiftyone_grounding.models.config import PRESETS, GrounderConfig, get_config
from fiftyone_grounding.models.encoders import load_encoder, load_tokenizer, tiny_encoder_dir
from fiftyone_grounding.errors import CheckpointError, ConfigError, EncoderUnavailableError
from fiftyone_grounding.models.losses import box_loss, grounding_loss, quality_loss
from fiftyone_grounding.models.build import build_model, build_tokenizer


def tokens(model, phrases):
    tok = build_tokenizer(model.config)
    t = tok(phrases, padding=True, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def test_seed_parameter_counts():
    with torch.device("meta"):  # the shapes are the counts: nothing allocated or initialized
        model = build_model("seed", weights=False)
    assert model.num_parameters() == 144_968_836
    assert model.num_parameters(trainable_only=True) == 25_948_420


# the real presets on the tiny encoders (2 DINOv3 layers): their own code, at a size a test can run
ON_TINY_ENCODERS = {"image_encoder": "tiny:dinov3", "text_encoder": "tiny:bert", "image_size": 64}
TINY_OVERRIDES = {"fusion": {"image_layers": [1, 2]}, "fusion-multi": {"image_layers": [1, 2]},
                  "adapter": {"adapter_layers": 2}}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_runs(preset):
    tiny = preset.startswith("tiny")
    overrides = {} if tiny else {**ON_TINY_ENCODERS, **TINY_OVERRIDES.get(preset, {})}
    model = build_model(preset, weights=tiny, **overrides)
    ids, mask = tokens(model, ["the red circle", "the small blue square on the left"])
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    out = model(pixels, ids, mask)
    boxes = out.clipped().boxes  # post-processed: inside the image (the raw boxes may reach past it)
    assert boxes.shape == (2, 4)
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    multi = model.config.num_queries > 0
    assert (out.quality is None) == (preset == "seed" or multi)
    if out.quality is not None:
        assert out.quality.shape == (2,) and torch.isfinite(out.quality).all()
    if not multi:
        assert len(out.aux_boxes) == getattr(model.config.arch, "refine_layers", 0)  # a box from every earlier stage
        return
    q = model.config.num_queries  # every query's box and score at every decoder layer, and the existence
    assert out.query_boxes.shape == (2, q, 4) and out.scores.shape == (2, q) and out.exists.shape == (2,)
    assert ((out.clipped().query_boxes >= 0) & (out.clipped().query_boxes <= 1)).all()
    # one stage per decoder layer before the last, and the selected proposals
    stages = model.config.arch.refine_layers - 1 + int(model.config.arch.query_selection)
    assert len(out.aux_boxes) == len(out.aux_scores) == stages
    confidence = out.box_confidences()
    assert ((confidence >= 0) & (confidence <= 1)).all()
    best = out.query_boxes[torch.arange(2), confidence.argmax(1)]
    assert torch.equal(best, out.boxes)  # boxes: each phrase's most confident box


ARCHITECTURES = ["tiny", "tiny-fusion", "tiny-adapter", "tiny-fusion-multi"]  # decoder, fusion, adapter, multi-box


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_frozen_encoders_get_no_gradient_and_do_not_change(preset):
    """Every trainable weight gets a gradient from the loss; no encoder weight gets one, nor
    changes over an optimizer step (the adapter's run inside the image encoder's blocks)."""
    torch.manual_seed(0)
    model = build_model(preset)
    ids, mask = tokens(model, ["the red circle", "the blue one"])
    pixels = torch.randn(2, 3, 64, 64)
    model.train()
    assert not model.image_encoder.training and not model.text_encoder.training
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith(("image_encoder.", "text_encoder."))}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if n not in frozen}
    assert frozen and trainable
    out = model(pixels, ids, mask)
    if model.config.num_queries:  # two boxes for the first phrase, none for the second
        target = [torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.4]]), torch.zeros(0, 4)]
        stages = model.config.arch.refine_layers - 1 + int(model.config.arch.query_selection)
        expected = {"l1", "giou", "score", "exist", "loss"} | {f"aux{k}" for k in range(stages)}
    else:
        target = torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 2)
        expected = {"l1", "giou", "quality", "exist", "loss"} | {
            f"aux{k}" for k in range(getattr(model.config.arch, "refine_layers", 0))}
    loss = grounding_loss(out, target, model.config.loss_weights, absent=None if model.config.num_queries
                          else torch.tensor([False, True]))  # (a phrase shown where its object is not)
    assert set(loss) == expected
    loss["loss"].backward()
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    assert sum(not torch.equal(params[n], before) for n, before in trainable.items()) > len(trainable) // 2


@pytest.mark.parametrize("preset", ARCHITECTURES)
def test_grouped_images_equal_one_by_one(preset):
    """Phrases grouped by image (each image encoded once; for the adapter, its lower blocks run
    once) give the boxes and qualities of one phrase with its own image at a time."""
    torch.manual_seed(0)
    model = build_model(preset).eval()
    if preset == "tiny-adapter":  # the adapters' outputs start at zero: open them, so that the phrase matters
        with torch.no_grad():
            for adapter in model.adapters:
                torch.nn.init.normal_(adapter.o_proj.weight, std=0.1)
    phrases = ["the red circle", "the large blue square", "the small white triangle at the top"]
    ids, mask = tokens(model, phrases)
    images = torch.randn(2, 3, 64, 64)
    image_index = torch.tensor([0, 1, 0])
    with torch.no_grad():
        grouped = model(images, ids, mask, image_index)
        single = [model(images[j:j + 1], ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())])
                  for i, j in enumerate(image_index.tolist())]
    assert torch.allclose(grouped.boxes, torch.cat([o.boxes for o in single]), atol=1e-5)
    for name in ("quality", "query_boxes", "scores", "exists"):
        if getattr(grouped, name) is not None:
            assert torch.allclose(getattr(grouped, name), torch.cat([getattr(o, name) for o in single]), atol=1e-5)
    assert not torch.allclose(grouped.boxes[0], grouped.boxes[2], atol=1e-4)  # same image, other phrase


def test_query_selection_starts_the_queries_from_the_phrases_most_likely_tokens():
    """With query_selection (the multi presets), the queries start at the top-scored patch tokens:
    the proposals are one more trained stage (their scores are those tokens' and get a gradient
    from the set loss), the decoder's first boxes are the proposals (detached); without it the
    learned anchors start the decoder as before."""
    torch.manual_seed(0)
    model = build_model("tiny-fusion-multi")
    assert model.config.arch.query_selection and not hasattr(model, "query_anchor")
    ids, mask = tokens(model, ["the red circle", "all the squares"])
    out = model(torch.randn(2, 3, 64, 64), ids, mask)
    q = model.config.num_queries
    proposals, proposal_scores = out.aux_boxes[0], out.aux_scores[0]
    assert proposals.shape == (2, q, 4) and proposal_scores.shape == (2, q)
    assert (proposal_scores[:, :-1] >= proposal_scores[:, 1:]).all()  # the top tokens, most likely first
    target = [torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.3, 0.95]])]
    grounding_loss(out, target, model.config.loss_weights)["aux0"].backward()
    assert model.token_score[1].weight.grad.abs().sum() > 0 and model.token_box[-1].weight.grad.abs().sum() > 0
    plain = build_model("tiny-fusion-multi", query_selection=False)
    assert not hasattr(plain, "token_score") and plain.query_anchor.shape == (q, 4)
    out = plain(torch.randn(2, 3, 64, 64), ids, mask)
    assert len(out.aux_boxes) == plain.config.arch.refine_layers - 1


def test_the_quality_head_learns_only_from_its_own_loss():
    """The box loss does not reach the quality head; the quality loss reaches nothing else (its
    inputs, the query and the box, come in detached, and so does the IoU target)."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    ids, mask = tokens(model, ["the red circle", "the blue one"])
    out = model(torch.randn(2, 3, 64, 64), ids, mask)
    target = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.9, 0.6]])
    box_terms = box_loss(out.boxes, target, model.config.loss_weights)["loss"]
    quality = quality_loss(out.quality, out.boxes, target)

    def grads(loss, module):
        return torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)

    assert all(g is None for g in grads(box_terms, model.quality_head))
    assert all(g is None for g in grads(quality, model.head))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(quality, model.quality_head))
    assert all(g is None for g in grads(quality, model.decoder))


@pytest.mark.parametrize("norm_first", [False, True])
def test_the_written_out_decoder_is_pytorchs(norm_first):
    """The decoder's layers, written out with each image's keys and values projected once, have
    the parameter names of ``nn.TransformerDecoder`` and give its outputs and gradients on the
    memory repeated per phrase."""
    torch.manual_seed(0)
    model = build_model("tiny", norm_first=norm_first, dropout=0.0).train()
    d, cfg = model.config.arch.d_model, model.config.arch
    reference = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(d, cfg.num_heads, cfg.dim_feedforward, 0.0, batch_first=True,
                                         norm_first=norm_first),
        cfg.num_layers, norm=torch.nn.LayerNorm(d) if norm_first else None).train()
    reference.load_state_dict(model.decoder.state_dict())  # strict: the same names and shapes
    memory = torch.randn(3, 17, d)
    queries = torch.randn(7, 5, d)
    padding = torch.zeros(7, 5, dtype=torch.bool)
    padding[1, 3:] = padding[4, 1:] = True
    image_index = torch.tensor([0, 2, 2, 1, 0, 0, 2])
    ours = model.decoder(queries, padding, memory, image_index)
    theirs = reference(queries, memory[image_index], tgt_key_padding_mask=padding)
    assert torch.allclose(ours[~padding], theirs[~padding], atol=1e-5)
    (ours[~padding] ** 2).sum().backward()
    (theirs[~padding] ** 2).sum().backward()
    for (name, a), b in zip(model.decoder.named_parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(model.decoder(queries, padding, memory, image_index)[~padding],
                              reference(queries, memory[image_index], tgt_key_padding_mask=padding)[~padding],
                              atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_query_positions_go_to_attention_queries_and_keys_only(norm_first):
    """DETR's decoder layer (models/transformer.py ``forward_pre`` / ``forward_post``): the query
    position is added to the self-attention's queries and keys and to the cross-attention's
    queries (``with_pos_embed``), never to a value or the residual stream. Written out here with
    PyTorch's own layer's modules; our layer must give the same."""
    from fiftyone_grounding.models.layers import DecoderBlock

    torch.manual_seed(0)
    d, heads = 32, 4
    ours = DecoderBlock(d, heads, 64, 0.0, norm_first=norm_first).eval()
    ref = torch.nn.TransformerDecoderLayer(d, heads, 64, 0.0, batch_first=True, norm_first=norm_first).eval()
    ref.load_state_dict(ours.state_dict())
    x, pos, memory = torch.randn(2, 5, d), torch.randn(2, 5, d), torch.randn(2, 11, d)

    def mlp(t):
        return ref.linear2(torch.relu(ref.linear1(t)))

    with torch.no_grad():
        if norm_first:  # forward_pre
            h = ref.norm1(x)
            t = x + ref.self_attn(h + pos, h + pos, value=h)[0]
            t = t + ref.multihead_attn(ref.norm2(t) + pos, memory, value=memory)[0]
            expected = t + mlp(ref.norm3(t))
        else:  # forward_post
            t = ref.norm1(x + ref.self_attn(x + pos, x + pos, value=x)[0])
            t = ref.norm2(t + ref.multihead_attn(t + pos, memory, value=memory)[0])
            expected = ref.norm3(t + mlp(t))
        got = ours(x, torch.zeros(2, 5, dtype=torch.bool), memory, torch.arange(2), query_pos=pos)
        assert torch.allclose(got, expected, atol=1e-5)
        # added to the input instead, the position would run through the values and the residual
        wrong = ours(x + pos, torch.zeros(2, 5, dtype=torch.bool), memory, torch.arange(2))
        assert not torch.allclose(wrong, expected, atol=1e-3)


def test_the_refinement_layer_adds_the_box_position_to_its_attention_query_only():
    """The one-box refinement layer (pre-norm cross-attention + MLP) with a query position: the
    residual stream is the query's own; the position only steers where it looks."""
    from fiftyone_grounding.models.layers import CrossBlock

    torch.manual_seed(1)
    d = 32
    block = CrossBlock(d, 4, 64).eval()
    x, pos, memory = torch.randn(3, 1, d), torch.randn(3, 1, d), torch.randn(3, 9, d)
    with torch.no_grad():
        attended = block.cross_attn(block.ln_1(x) + pos, keys_values=memory)
        t = x + attended
        expected = t + block.mlp(block.ln_2(t))
        assert torch.allclose(block(x, memory, query_pos=pos), expected, atol=1e-6)
        assert not torch.allclose(block(x + pos, memory), expected, atol=1e-3)


def test_tiny_encoders_load_through_from_pretrained(tmp_path):
    from transformers import AutoModel

    folder = tiny_encoder_dir("tiny:dinov3")
    assert (folder / "config.json").exists()
    direct = AutoModel.from_pretrained(folder)
    ours = load_encoder(str(folder))
    for (n1, p1), (n2, p2) in zip(direct.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    tok = load_tokenizer("tiny:bert")
    assert tok.tokenize("the bright red circle on the left")[-1] == "left"


def test_unreachable_encoder_says_what_to_do(tmp_path):
    with pytest.raises(EncoderUnavailableError, match="gated.*log"):
        load_encoder("facebook/dinov3-vitb16-pretrain-lvd1689m")
    with pytest.raises(EncoderUnavailableError, match="local folder"):
        load_tokenizer("BAAI/bge-small-en-v1.5")
    with pytest.raises(EncoderUnavailableError, match="does not hold"):
        load_encoder(str(tmp_path))


def test_config_json_round_trip_and_validation(tmp_path):
    assert get_config("grounder", image_encoder="vitl16").image_encoder == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    cfg = get_config("grounder", image_size=448)
    cfg.to_json(tmp_path / "c.json")
    assert GrounderConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="num_heads"):
        get_config("seed", num_heads=7)
    with pytest.raises(ValueError, match="Unknown GrounderConfig keys"):
        GrounderConfig.from_dict({"preset": "x", "__class__": "os.system"})
    with pytest.raises(ValueError, match="Unknown preset"):
        get_config("nope")
    with pytest.raises(ValueError, match=r"Unknown GrounderConfig keys: \['image_sise'\]"):
        get_config("tiny", image_sise=32)


def test_checkpoint_round_trip_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["image_encoder"] == "tiny:dinov3"
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert not any(k.startswith(("image_encoder.", "text_encoder.")) for k in keys)
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids, mask = tokens(model, ["the large green square", "the red one on the right"])
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(pixels, ids, mask), loaded(pixels, ids, mask)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.quality, b.quality)


def test_pickle_checkpoint_refused(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint(tmp_path / "missing")


V1_CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints_v1"


@pytest.mark.parametrize("name", ["post_norm_text_query", "pre_norm_reg_query"])
def test_checkpoints_of_the_first_decoder_load_and_give_their_boxes(name):
    """Checkpoints written by the decoder as it was before the layers were written out (its
    nn.TransformerDecoder state-dict names): they load, and give the boxes they gave then."""
    expected = json.loads((V1_CHECKPOINTS / name / "expected.json").read_text())
    g = torch.Generator().manual_seed(expected["features_seed"])
    image_features = torch.randn(*expected["image_features"], generator=g)
    text_features = torch.randn(*expected["text_features"], generator=g)
    model = load_checkpoint(V1_CHECKPOINTS / name)
    with torch.no_grad():
        out = model.decode(image_features, text_features, torch.tensor(expected["attention_mask"]),
                           torch.tensor(expected["image_index"]))
    torch.testing.assert_close(out.boxes, torch.tensor(expected["boxes"]), atol=1e-5, rtol=0)
    if expected["quality"] is not None:
        torch.testing.assert_close(out.quality, torch.tensor(expected["quality"]), atol=1e-5, rtol=0)


def test_a_setting_the_architecture_does_not_read_is_refused_by_name():
    """Silently ignored, it would train something other than what was asked."""
    from fiftyone_grounding.models.config import unused_fields
    from fiftyone_grounding.engine.config import TrainConfig

    with pytest.raises(ConfigError, match=r"\['norm_first'\] do nothing in the fusion architecture"):
        get_config("fusion", norm_first=False)
    with pytest.raises(ConfigError, match=r"\['d_model'\] do nothing in the adapter architecture"):
        get_config("adapter", d_model=128)
    with pytest.raises(ConfigError, match=r"\['adapter_dim', 'image_layers'\] do nothing in the decoder"):
        get_config("grounder", image_layers=[6, 12], adapter_dim=64)
    with pytest.raises(ConfigError, match=r"\['score_thresh'\] do nothing in the fusion architecture without box"):
        get_config("fusion", score_thresh=0.5)
    with pytest.raises(ConfigError, match=r"norm_first"):
        TrainConfig(preset="tiny-fusion", model={"norm_first": False})
    # what an architecture reads stays open: fusion honours pos_embed, multi-box presets score_thresh
    assert get_config("fusion", pos_embed="none").arch.pos_embed == "none"
    assert get_config("fusion-multi", score_thresh=0.5).score_thresh == 0.5
    assert "pos_embed" not in unused_fields(get_config("fusion")) and "d_model" in unused_fields(get_config("adapter"))


def test_fusion_honours_pos_embed():
    model = build_model("tiny-fusion").eval()
    plain = build_model("tiny-fusion", pos_embed="none").eval()
    plain.load_state_dict(model.state_dict())
    positions = model._image_positions(torch.device("cpu"), torch.float32)
    assert torch.equal(plain._image_positions(torch.device("cpu"), torch.float32),
                       model.level_embed[torch.repeat_interleave(torch.arange(2), torch.tensor(model.level_sizes()))])
    assert not torch.allclose(positions, plain._image_positions(torch.device("cpu"), torch.float32))


def test_an_image_size_off_the_patch_grid_is_refused():
    """A partial patch would be dropped by the encoder: a border strip of every image lost."""
    with pytest.raises(ConfigError, match=r"multiple of the image encoder's patch size \(16 px\)"):
        get_config("grounder", image_size=230)
    with pytest.raises(ConfigError, match=r"patch size \(8 px\)"):
        get_config("tiny", image_size=60)
    folder = tiny_encoder_dir("tiny:dinov3")  # an encoder known only by its folder: checked once built
    with pytest.raises(ConfigError, match=r"not a multiple of the image encoder's patch size \(8 px\).*56 or 64"):
        build_model("tiny", image_encoder=str(folder), image_size=60)
    assert get_config("grounder", image_size=448).image_size == 448
