"""Issue 18: stage=vlm, a LLaVA from a vision tower, a projector and an lmlab language model, trained on image chats.

The mask is checked token by token, the image features are checked at the placeholder positions, every freeze policy
is checked to leave its parts bit-identical, the export is loaded with plain transformers (AutoProcessor +
AutoModelForImageTextToText) and gives equal logits, bad images name their record, and a tiny model trained on the
generated shapes set answers held-out colour questions well above chance, falling back to chance with its images
zeroed.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg, connect, expected, hydra_job
from omegaconf import OmegaConf
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
)

import eval as eval_script  # noqa: E402
import generate as generate_script  # noqa: E402
from datamodules.formats import DataError
from datamodules.vision import VisionChatDataModule
from lightning_modules.lm import LMModule, freeze_parameters
from lmlab.core.collate import IGNORE_INDEX
from lmlab.core.models import build_model, export_hf, load_model
from lmlab.core.vision import (
    add_image_token,
    attach_vision,
    export_processor,
    image_processor,
    image_prompt,
    image_slots,
    parts,
)
from lmlab.infer.conversation import ChatSession
from lmlab.infer.generation import load_for_inference, load_image
from train import train

sys.path.insert(0, str(REPO / "scripts"))
from make_shapes import make, write  # noqa: E402

VISION = OmegaConf.load(REPO / "conf" / "vision" / "clip-tiny.yaml")
MODEL = OmegaConf.load(REPO / "conf" / "model" / "llama-tiny.yaml")
TOKENS = 16  # clip-tiny: 32x32 images in 8x8 patches, CLS dropped


def png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, format="PNG")
    return out.getvalue()


def vlm(tokenizer):
    """A tiny LLaVA (llama-tiny + clip-tiny) for ``tokenizer``, which gets the image token."""
    torch.manual_seed(0)
    add_image_token(tokenizer, VISION.image_token)
    return attach_vision(build_model(MODEL, tokenizer), VISION, tokenizer)


def datamodule(tokenizer, files: list[Path], **fields) -> VisionChatDataModule:
    dm = VisionChatDataModule([str(f) for f in files], val_files=[str(files[0])], **fields)
    connect(dm, tokenizer, max_length=256, batch_size=4)
    dm.connect_images(VISION.image_token, TOKENS, image_processor(VISION, 32))
    return dm


@pytest.fixture
def chats(tmp_path) -> Path:
    """Image chats in jsonl with image files beside them: a system turn, the placeholder mid-prompt, two rounds."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png((220, 40, 40)))
    rows = [
        {
            "image": "img/red.png",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Look: <image>\nWhat color?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "yes"},
            ],
        },
        {
            "image": "img/red.png",
            "conversations": [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}],
        },
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_mask_is_exactly_on_image_system_and_prompt_positions(tiny_tokenizer, chats):
    """Token by token: labels are the reply tokens (content and the template's end) and -100 everywhere else; the
    placeholder became TOKENS image tokens where the data put it, or at the start of the first user turn."""
    model_tokenizer = tiny_tokenizer
    add_image_token(model_tokenizer, VISION.image_token)
    dm = datamodule(model_tokenizer, [chats])
    dm.setup()
    image_id = model_tokenizer.convert_tokens_to_ids(VISION.image_token)
    system_image_first = [s for s in dm.train_set.samples if s["where"][1] == 1][0]
    ids, labels = system_image_first["input_ids"].tolist(), system_image_first["labels"].tolist()
    image = "<image>" * TOKENS
    segments = [
        ("<|system|>\nAnswer briefly.\n<|user|>\nLook: " + image + "\nWhat color?\n<|assistant|>\n", False),
        ("red<|endoftext|>", True),
        ("<|user|>\nSure?\n<|assistant|>\n", False),
        ("yes<|endoftext|>", True),
    ]
    want_ids, want_labels = expected(model_tokenizer, segments)
    assert ids == want_ids
    assert labels == want_labels
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == TOKENS and positions == list(range(positions[0], positions[0] + TOKENS))
    assert all(labels[i] == IGNORE_INDEX for i in positions)
    llava_style = [s for s in dm.train_set.samples if s["where"][1] == 2][0]["input_ids"].tolist()
    first_user = model_tokenizer.encode("<|user|>\n", add_special_tokens=False)
    start = llava_style.index(image_id)
    assert llava_style[start - len(first_user) : start] == first_user, "placeholder put at the first user turn's start"


def test_image_features_enter_at_the_placeholder_positions(tiny_tokenizer):
    """The language model's input embeddings are the projected image features at the image tokens, in order, and the
    token embeddings everywhere else."""
    model = vlm(tiny_tokenizer).eval()
    image_id = model.config.image_token_id
    ids = torch.tensor([[5, 6, *[image_id] * TOKENS, 7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        tokens = model.get_input_embeddings()(ids)
    hook.remove()
    embeds = seen["embeds"][0]
    assert features.shape[0] == TOKENS == model.config.image_seq_length
    assert torch.equal(embeds[2 : 2 + TOKENS], features)
    assert torch.equal(embeds[:2], tokens[0, :2]) and torch.equal(embeds[-2:], tokens[0, -2:])
    other = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        changed = model(input_ids=ids, pixel_values=other).logits
        same = model(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(changed[0, -1], same[0, -1]), "the answer position reads the image"


@pytest.mark.parametrize(
    "policy", [["vision"], ["language"], ["vision", "language"], ["projector"], ["vision", "projector"]]
)
def test_each_freeze_policy_leaves_its_parts_bit_identical(tiny_tokenizer, policy):
    """Three AdamW steps with the policy's parts frozen: they are bit-identical, every other part moved."""
    model = vlm(tiny_tokenizer)
    frozen = freeze_parameters(model, policy)
    assert frozen, policy
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    image_id = model.config.image_token_id
    ids = torch.tensor([[5, *[image_id] * TOKENS, 7, 8, 9]] * 2)
    for _ in range(3):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    groups = {part: {id(p) for m in modules for p in m.parameters()} for part, modules in parts(model).items()}
    for name, p in model.named_parameters():
        part = next(part for part, ids_ in groups.items() if id(p) in ids_)
        if part in policy:
            assert torch.equal(p, before[name]), f"{name} ({part}) moved under freeze={policy}"
    for part in set(groups) - set(policy):
        moved = [n for n, p in model.named_parameters() if id(p) in groups[part] and not torch.equal(p, before[n])]
        assert moved, f"no {part} parameter trained under freeze={policy}"


def test_the_export_loads_in_plain_transformers_with_equal_logits(tiny_tokenizer, chats, tmp_path):
    """AutoProcessor + AutoModelForImageTextToText on hf/: the processor's ids for a rendered prompt with one
    placeholder are the datamodule's, and the logits equal the trained model's."""
    model = vlm(tiny_tokenizer).eval()
    images = image_processor(VISION, 32)
    out = tmp_path / "hf"
    export_hf(model, tiny_tokenizer, out)
    export_processor(model, tiny_tokenizer, images, out)
    processor = AutoProcessor.from_pretrained(out)
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    dm = datamodule(tiny_tokenizer, [chats])
    dm.setup()
    prompt, _ = dm.sample_pairs(1)[0]
    one_placeholder = prompt.replace(VISION.image_token * TOKENS, VISION.image_token)
    picture = Image.open(io.BytesIO(png((220, 40, 40))))
    inputs = processor(images=[picture], text=[one_placeholder], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert torch.equal(inputs["pixel_values"], dm.sample_images(1))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    picture_file = tmp_path / "red.png"
    picture_file.write_bytes(png((220, 40, 40)))
    parts_format = [{"type": "image", "path": str(picture_file)}, {"type": "text", "text": "Color?"}]
    chat = processor.apply_chat_template(
        [{"role": "user", "content": parts_format}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    training_prompt = image_prompt(
        tiny_tokenizer, [{"role": "user", "content": "Color?"}], *image_slots(model, tiny_tokenizer)
    )
    assert chat["input_ids"][0] == tiny_tokenizer.encode(training_prompt, add_special_tokens=False)
    assert torch.equal(torch.as_tensor(chat["pixel_values"]), inputs["pixel_values"])


def test_a_missing_or_unreadable_image_names_its_line(tiny_tokenizer, tmp_path):
    add_image_token(tiny_tokenizer, VISION.image_token)
    (tmp_path / "ok.png").write_bytes(png((0, 0, 255)))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    chat = {"messages": [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "blue"}]}
    rows = [{"image": "ok.png", **chat}, {"image": "missing.png", **chat}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'image': image file not found"):
        datamodule(tiny_tokenizer, [path]).setup()
    rows[1]["image"] = "broken.png"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'image': cannot read the image"):
        datamodule(tiny_tokenizer, [path]).setup()
    skipping = datamodule(tiny_tokenizer, [path], on_error="skip")
    skipping.setup()
    assert skipping.skips.skipped["bad records"] == 2  # line 2, read for train and for val
    (tmp_path / "ok.png").write_bytes(b"cut off")  # broken after setup: the batch names the record
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'image': cannot read the image"):
        skipping.collator()(skipping.train_set.samples)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_every_trainable_parameter_gets_a_gradient(tiny_tokenizer, preset):
    """One backward pass reaches every trainable parameter (DDP refuses one that gets none): the tower's final norm,
    which no feature reads, is frozen. GPT-2, whose tied head LLaVA cannot tie, gets an untied copy."""
    torch.manual_seed(0)
    add_image_token(tiny_tokenizer, VISION.image_token)
    lm_cfg = OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml")
    model = attach_vision(build_model(lm_cfg, tiny_tokenizer), VISION, tiny_tokenizer)
    ids = torch.tensor([[5, *[model.config.image_token_id] * TOKENS, 7, 8]])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not any(p.requires_grad for p in model.model.vision_tower.post_layernorm.parameters())


def test_a_mixture_of_experts_is_refused(tiny_tokenizer):
    add_image_token(tiny_tokenizer, VISION.image_token)
    moe = build_model(OmegaConf.load(REPO / "conf" / "model" / "llama-moe-tiny.yaml"), tiny_tokenizer)
    with pytest.raises(ValueError, match="mixture of experts"):
        attach_vision(moe, VISION, tiny_tokenizer)


def test_a_pretrained_tower_loads_and_stage_one_trains_the_projector_only(tmp_path):
    """vision.from (a saved CLIP vision model) fills the tower; init_from (an lmlab run) fills the language model;
    freeze=[vision, language] (LLaVA's first stage) exports both unchanged and a trained projector."""
    lm_run, vlm_run, tower_dir = tmp_path / "lm", tmp_path / "vlm", tmp_path / "tower"
    train(compose_cfg(lm_run, ["stage=sft", "max_steps=2", "callbacks.samples.num_prompts=0"]))
    torch.manual_seed(1)
    tower_config = CLIPVisionConfig(**{k: v for k, v in VISION.config.items() if k != "_target_"})
    CLIPVisionModel(tower_config).save_pretrained(tower_dir)
    shapes = tmp_path / "shapes.parquet"
    write(make(40, 32, 0), shapes)
    train(
        compose_cfg(
            vlm_run,
            [
                "stage=vlm",
                f"init_from={lm_run}",
                f"vision.from={tower_dir}",
                "stage.module.freeze=[vision,language]",
                f"data.train_files=[{shapes}]",
                "data.val_files=null",
                "data.val_fraction=0.2",
                "max_steps=4",
                "trainer.val_check_interval=2",
                "trainer.limit_val_batches=1",
                "callbacks.samples.num_prompts=1",
            ],
        )
    )
    exported = AutoModelForImageTextToText.from_pretrained(vlm_run / "hf")
    tower = CLIPVisionModel.from_pretrained(tower_dir).state_dict()
    for name, value in exported.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower[name]), name
    lm = AutoModelForCausalLM.from_pretrained(lm_run / "hf")
    language = {**exported.model.language_model.state_dict(), "lm_head": exported.lm_head.weight}
    for name, value in {**lm.model.state_dict(), "lm_head": lm.lm_head.weight}.items():
        if name in ("embed_tokens.weight", "lm_head"):  # one row more: the image token's
            assert torch.equal(language[name][: len(value)], value), name
        else:
            assert torch.equal(language[name], value), name
    projector = sum(p.numel() for p in exported.model.multi_modal_projector.parameters())
    assert json.loads((vlm_run / "summary.json").read_text())["trainable_parameters"] == projector
    sample = json.loads((vlm_run / "samples.jsonl").read_text().splitlines()[0])  # generated from an image
    assert sample["prompt"].count(VISION.image_token) == TOKENS and isinstance(sample["output"], str)


@pytest.mark.slow
def test_a_tiny_model_answers_from_the_image_and_falls_to_chance_without_it(tmp_path):
    """300 CPU steps on generated colour questions (4 colours: chance 1/4): held-out accuracy (new pictures) well
    above chance, and with every image zeroed at about the blind baseline (eval.py task=vqa blank_image=true)."""
    train_file, val_file = tmp_path / "train.parquet", tmp_path / "val.parquet"
    write(make(2000, 32, 0, ("color",)), train_file)
    write(make(100, 32, 1, ("color",)), val_file)
    run = tmp_path / "run"
    data = [f"data.train_files=[{train_file}]", f"data.val_files=[{val_file}]"]
    train(
        compose_cfg(
            run,
            ["stage=vlm", *data, "max_steps=300", "batch_size=16", "lr=1e-3", "trainer.val_check_interval=100"],
        )
    )
    results = {}
    for blank in (False, True):
        out = tmp_path / f"eval-{blank}"
        overrides = [f"run={run}", "task=vqa", "data=shapes", *data, f"blank_image={blank}", f"out_dir={out}"]
        with hydra_job("eval", [*overrides, "wandb.enabled=false", "progress=false", "batch_size=50"]) as cfg:
            eval_script.main(cfg)
        results[blank] = json.loads((out / "eval.json").read_text())["metrics"]
    seeing, blind = results[False], results[True]
    assert seeing["acc"] >= 0.7, seeing  # measured 0.98 (tower frozen, the default; 1.0 all trained)
    assert blind["acc"] <= seeing["blind_acc"] + 0.2, blind  # measured 0.18 against a blind baseline of 0.23
    assert seeing["acc"] - blind["acc"] >= 0.4


def unique_numel(*modules: torch.nn.Module, trainable: bool = False) -> int:
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad or not trainable}
    return sum(p.numel() for p in params.values())


@pytest.mark.parametrize("freeze", [[], ["vision"], ["language"]])
def test_flops_count_the_tower_per_patch_the_projector_per_feature_and_the_lm_per_token(tiny_tokenizer, freeze):
    """A batch of 2 rows of 24 tokens and 2 images: the language model over every position (image placeholders
    included), the projector over each image's 16 features, the tower over each image's 17 patches (16 + CLS) with
    its own attention term; frozen parts forward only (2N), except a frozen language model above a training
    projector (the gradient passes through it: 4N)."""
    model = vlm(tiny_tokenizer)
    module = LMModule(model, {}, freeze=freeze)
    inner, text, vision = model.model, model.config.text_config, model.config.vision_config
    embeddings = inner.vision_tower.embeddings
    lookups = embeddings.position_embedding.weight.numel() + embeddings.class_embedding.numel()
    # the token table is a look-up; the head's matmul counts (tied to that table or not)
    lm = unique_numel(inner.language_model) - model.get_input_embeddings().weight.numel() + model.lm_head.weight.numel()
    projector = unique_numel(inner.multi_modal_projector)
    tower = unique_numel(inner.vision_tower) - lookups
    tower_trainable = unique_numel(inner.vision_tower, trainable=True)
    if freeze == ["vision"]:
        assert tower_trainable == 0
    else:  # all but the final norm (settle_tower froze it: no feature reads it); its look-ups train
        assert tower_trainable == tower + lookups - unique_numel(inner.vision_tower.post_layernorm)
        tower_trainable -= lookups
    patches, features, batch, length = TOKENS + 1, TOKENS, 2, 24
    per_token = (4 if freeze == ["language"] else 6) * lm + 12 * text.num_hidden_layers * text.hidden_size * length
    per_patch = 2 * tower + 4 * tower_trainable + 12 * vision.num_hidden_layers * vision.hidden_size * patches
    per_image = patches * per_patch + features * 6 * projector
    ids = torch.zeros(batch, length, dtype=torch.long)
    module._count_flops({"input_ids": ids, "labels": ids, "pixel_values": torch.zeros(batch, 3, 32, 32)})
    assert module.flops_per_batch == batch * length * per_token + batch * per_image
    module._count_flops({"input_ids": ids, "labels": ids, "pixel_values": torch.zeros(1, 3, 32, 32)})
    assert module.flops_per_batch == batch * length * per_token + per_image, "cached per number of images too"


def test_init_from_a_vlm_export_takes_the_presets_dropout_into_its_text_config(tiny_tokenizer, tmp_path, caplog):
    """``+model.config.attention_dropout=0.1`` with init_from a vlm run: the LlavaConfig keeps the language model's
    dropout in text_config, where the preset's key is compared and set (top-level keywords would never reach it)."""
    export_hf(vlm(tiny_tokenizer), tiny_tokenizer, tmp_path)
    caplog.set_level(logging.INFO)
    preset = OmegaConf.merge(MODEL, {"config": {"attention_dropout": 0.1}})
    model = load_model(tmp_path, preset, tiny_tokenizer)
    assert model.config.text_config.attention_dropout == 0.1
    assert model.model.language_model.config.attention_dropout == 0.1
    assert model.model.language_model.layers[0].self_attn.attention_dropout == 0.1
    assert "dropout from model=llama-tiny: {'attention_dropout': 0.1}" in caplog.text
    assert "keeps its own" not in caplog.text, "the same preset: nothing else differs"
    assert load_model(tmp_path, MODEL, tiny_tokenizer).config.text_config.attention_dropout == 0.0


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory) -> Path:
    """A vlm run on 40 generated scenes, a few steps (its answers need not be right, only the same everywhere)."""
    run = tmp_path_factory.mktemp("vlm") / "run"
    shapes = run.parent / "shapes.parquet"
    write(make(40, 32, 0), shapes)
    data = [f"data.train_files=[{shapes}]", "data.val_files=null", "data.val_fraction=0.2"]
    train(compose_cfg(run, ["stage=vlm", *data, "max_steps=6", "callbacks.samples.num_prompts=0"]))
    return run


def test_generate_and_chat_answer_about_an_image_as_plain_transformers_does(vlm_run, tmp_path, capsys):
    """generate.py image=... and a chat session with image= give plain transformers' greedy answer: AutoProcessor's
    ids for the prompt with one placeholder and its pixels, then generate()."""
    picture = tmp_path / "blue.png"
    picture.write_bytes(png((40, 80, 220)))
    processor = AutoProcessor.from_pretrained(vlm_run / "hf")
    plain = AutoModelForImageTextToText.from_pretrained(vlm_run / "hf").eval()
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(images=[Image.open(picture)], text=[text], return_tensors="pt")
    out = plain.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    overrides = [f"run={vlm_run}", f"image={picture}", "prompt='What color?'", "generation.max_new_tokens=6"]
    with hydra_job("generate", overrides) as cfg:
        generate_script.main(cfg)
    assert capsys.readouterr().out.strip() == want.strip()

    model, tokenizer = load_for_inference(vlm_run, "cpu")
    session = ChatSession(
        model, tokenizer, {"max_new_tokens": 6, "do_sample": False}, image=load_image(model, vlm_run, picture)
    )
    assert session.reply("What color?").strip() == want.strip()
    assert session.render("And the shape?").count("<image>") == model.config.image_seq_length  # one image, kept

    text_only = tmp_path / "text-only"
    with pytest.raises(ValueError, match="text-only model"):
        load_image(AutoModelForCausalLM.from_config(plain.config.text_config), text_only, picture)
