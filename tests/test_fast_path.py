"""The fast path on the CPU (issue 15): what changes for speed leaves every number that counts the same."""

from __future__ import annotations

import copy
import os
import traceback
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg
from hydra import compose, initialize_config_dir
from lightning.pytorch import LightningModule
from torch.overrides import TorchFunctionMode

from lightning_modules.lm import lm_forward
from lmlab.core.collate import CausalCollator
from lmlab.core.models import build_model
from train import train


def tiny_model(name: str, tokenizer):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    torch.manual_seed(0)
    return build_model(cfg.model, tokenizer).eval()


def train_with_probe(cfg, probe) -> None:
    """train.py's run of ``cfg`` (no sample generations) with ``probe`` among the Trainer's callbacks."""
    import train as train_module

    cfg.callbacks.samples.num_prompts = 0
    original = train_module.instantiate

    def with_probe(config, *args, **kwargs):
        if kwargs.get("callbacks") is not None:  # the Trainer's instantiate
            kwargs["callbacks"] = [*kwargs["callbacks"], probe]
        return original(config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "instantiate", with_probe)
        train_module.train(cfg)


def samples(lengths: list[int], vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_a_padded_causal_batch_runs_unmasked_causal_sdpa_with_each_rows_own_logits(tiny_tokenizer, name, monkeypatch):
    """Right padding needs no mask: SDPA gets attn_mask=None, is_causal=True (its flash kernel on a GPU), and each
    row's logits and loss equal those of the row alone."""
    model = tiny_model(name, tiny_tokenizer)
    batch_samples = samples([9, 4, 7], len(tiny_tokenizer))
    collate = CausalCollator(tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        padded = lm_forward(model, collate(batch_samples), with_loss=False).logits
        assert calls and all(mask is None and causal for mask, causal in calls), calls
        for i, sample in enumerate(batch_samples):
            alone = lm_forward(model, collate([sample]), with_loss=False).logits[0]
            n = len(sample["input_ids"]) - 1
            torch.testing.assert_close(padded[i, :n], alone[:n], rtol=1e-5, atol=1e-5)
        batch = collate(batch_samples)
        unmasked = lm_forward(model, batch, with_loss=True).loss
        masked = model(**batch, shift_labels=batch["labels"], use_cache=False).loss
    torch.testing.assert_close(unmasked, masked, rtol=1e-6, atol=1e-6)


def test_a_moe_keeps_the_padding_mask_for_its_load_balancing_loss(tiny_tokenizer):
    model = tiny_model("llama-moe-tiny", tiny_tokenizer)
    batch = CausalCollator(tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)(samples([9, 3], len(tiny_tokenizer)))
    with torch.no_grad():
        ours = lm_forward(model, batch, with_loss=True).loss
        masked = model(**batch, shift_labels=batch["labels"], use_cache=False).loss
        unmasked = model(**{**batch, "attention_mask": None}, shift_labels=batch["labels"], use_cache=False).loss
    assert ours == masked and ours != unmasked


@pytest.mark.parametrize("compile, mode", [(True, "default"), (False, None), ("reduce-overhead", "reduce-overhead")])
@pytest.mark.parametrize("fused", [True, False])
def test_compile_compiles_the_live_dpo_reference_with_the_policy(tiny_tokenizer, monkeypatch, compile, mode, fused):
    """Both models are compiled where they run (with the fused head, answer_logps, their base models), in the
    torch.compile mode ``compile`` names."""
    from lightning_modules.dpo import DPOModule

    modes, compile_ = [], torch.compile

    def recording(fn, **kwargs):
        modes.append(kwargs["mode"])
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    optim = {"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3}, "weight_decay": 0.0}
    model = tiny_model("llama-tiny", tiny_tokenizer)
    module = DPOModule(model, optim, beta=0.1, compile=compile, fused_lm_head=fused)
    module.configure_model()
    runs = [m.base_model if fused else m for m in (module.model, module.reference)]
    assert [m._compiled_call_impl is not None for m in runs] == [mode is not None] * 2
    assert modes == ([mode] * 2 if mode else [])


def fake_liger(monkeypatch) -> list[dict]:
    """A stand-in for liger_kernel's table of patch functions (Liger needs Triton and CUDA), on a 'CUDA' machine:
    records the keywords each call gets."""
    import sys
    import types

    calls: list[dict] = []

    def apply_liger_kernel_to_llama(
        rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=None
    ):
        calls.append({k: v for k, v in locals().items() if k != "calls"})

    def apply_liger_kernel_to_llava(cross_entropy=False, fused_linear_cross_entropy=True, model=None, **kwargs):
        switches = {"cross_entropy": cross_entropy, "fused_linear_cross_entropy": fused_linear_cross_entropy}
        calls.append({**switches, "model": model, **kwargs})

    module = types.ModuleType("liger_kernel.transformers.monkey_patch")
    module.MODEL_TYPE_TO_APPLY_LIGER_FN = {
        "llama": apply_liger_kernel_to_llama,
        "llava": apply_liger_kernel_to_llava,
        "": None,
    }
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def test_kernels_switch_on_exactly_the_liger_kernels_asked_for(tiny_tokenizer, monkeypatch):
    """Each switch reaches Liger's patch function as given, the ones off as False (Liger's own defaults are on),
    and a run with every switch off never imports Liger."""
    from lmlab.core.kernels import apply_kernels

    model = tiny_model("llama-tiny", tiny_tokenizer)
    assert apply_kernels(model, {"rope": False, "rms_norm": False}) == []  # the CPU default: nothing imported
    calls = fake_liger(monkeypatch)
    assert apply_kernels(model, {"rms_norm": True, "swiglu": True, "rope": False}) == ["rms_norm", "swiglu"]
    want = dict(rope=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True, cross_entropy=False)
    assert calls == [{**want, "model": model}]
    # llava's function takes the language model's switches as **kwargs: all four go through, the ones off as False
    calls.clear()
    model.config.model_type = "llava"
    assert apply_kernels(model, {"fused_linear_cross_entropy": True}) == ["fused_linear_cross_entropy"]
    assert calls == [{**want, "rms_norm": False, "swiglu": False, "fused_linear_cross_entropy": True, "model": model}]


def test_kernels_refuse_what_liger_cannot_do_before_touching_the_model(tiny_tokenizer, monkeypatch):
    from lmlab.core.kernels import apply_kernels

    llama = tiny_model("llama-tiny", tiny_tokenizer)
    with pytest.raises(ValueError, match=r"kernels.rope=true: Liger's kernels are Triton kernels for CUDA"):
        apply_kernels(llama, {"rope": True})  # this CPU box
    calls = fake_liger(monkeypatch)
    with pytest.raises(ValueError, match=r"unknown switch\(es\) \['layer_norm'\]"):
        apply_kernels(llama, {"layer_norm": True})
    with pytest.raises(ValueError, match=r"no kernels for gpt2 models; it has: \['llama', 'llava'\]"):
        apply_kernels(tiny_model("gpt2-tiny", tiny_tokenizer), {"rms_norm": True})
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification is no causal LM"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=["model=llama-tiny"])
        classifier = build_model(cfg.model, tiny_tokenizer, labels=["ham", "spam"])
        apply_kernels(classifier, {"fused_linear_cross_entropy": True})
    with pytest.raises(ValueError, match=r"does not run under compile=true"):
        apply_kernels(llama, {"fused_linear_cross_entropy": True, "rms_norm": True}, compile=True)
    assert calls == []


class HostReads(TorchFunctionMode):
    """Records the training step of every call that reads a tensor's value on the host (``.item()``, ``.tolist()``,
    ``bool()``, ``float()``...): on a GPU each waits for the device to finish its queue of kernels. Left out: the data
    loader's (its tensors are on the host) and transformers' eager-only check for packed rows (traced away under
    compile)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy", "masked_select", "unique"}

    def __init__(self, step: dict):
        super().__init__()
        self.step, self.seen = step, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and self.step["now"] is not None:
            stack = traceback.extract_stack()
            if not any("utils/data" in f.filename or f.filename.endswith("masking_utils.py") for f in stack):
                where = [f"{Path(f.filename).name}:{f.lineno}" for f in stack if "/torch/" not in f.filename]
                self.seen.append((self.step["now"], func.__name__, where[-3:]))
        return func(*args, **(kwargs or {}))


def test_training_steps_log_and_read_the_device_only_at_log_steps(tmp_path, addition_pairs, monkeypatch):
    """Between log steps a training step never waits for the device: nothing in the loop, the objective or the
    callbacks reads a tensor back to the host (Lightning read prog_bar metrics at every batch's end, the
    memorization guard read the loss at every step). And each self.log costs host time at every call (Lightning walks
    the stored metric to move it to the value's device): the objectives log at log steps alone, as Lightning writes
    training metrics there only. The bar reads them once after each log step, whatever its refreshes do (they count
    an epoch's batches). Fused AdamW, as trainer=gpu runs it: CPU AdamW reads its step counts. transformers'
    own check for packed rows reads the position ids at every eager forward; compile=true traces it away."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from lmlab.train.callbacks import ProgressBar

    logged: list[tuple[int, str]] = []
    log, advance = LightningModule.log, _TrainingEpochLoop.advance
    step = {"now": None}

    def log_spy(self, name, *args, **kwargs):
        if self.trainer.training:
            logged.append((self.global_step, name))
        return log(self, name, *args, **kwargs)

    def advance_spy(self, *args, **kwargs):
        step["now"] = self.trainer.global_step
        try:
            return advance(self, *args, **kwargs)
        finally:
            step["now"] = None

    def bar_spy(self, trainer):
        bar_read(self, trainer)
        bar_reads.append((trainer.global_step, "train/loss" in self._shown))

    bar_read, bar_reads = ProgressBar._read, []
    monkeypatch.setattr(LightningModule, "log", log_spy)
    monkeypatch.setattr(_TrainingEpochLoop, "advance", advance_spy)
    monkeypatch.setattr(ProgressBar, "_read", bar_spy)
    pairs = [f"data.train_files=[{addition_pairs}]", f"data.val_files=[{addition_pairs}]"]
    # 5-batch epochs of 2-batch windows: optimizer steps of 2, 2 and 1 batches; the bar's refreshes every 3 batches of
    # an epoch fall between log steps
    accumulated = ["trainer.accumulate_grad_batches=2", "+trainer.limit_train_batches=5"]
    runs = {"pretrain": [], "classify": [], "dpo": pairs, "accumulated": accumulated}
    fused_bar = ["optim.optimizer.fused=true", "callbacks.progress.refresh_rate=3"]
    for name, extra in runs.items():
        logged.clear()
        bar_reads.clear()
        stage = "pretrain" if name == "accumulated" else name
        overrides = [f"stage={stage}", "max_steps=6", "trainer.log_every_n_steps=3", "trainer.val_check_interval=6"]
        with HostReads(step) as reads:
            train(compose_cfg(tmp_path / name, [*overrides, *extra, *fused_bar]))
        assert {s for s, _ in logged} == {2, 5}, (name, logged)
        assert {"train/loss", "lr"} <= {metric for _, metric in logged}, name
        assert {s for s, _, _ in reads.seen} == {2, 5}, (name, [r for r in reads.seen if r[0] not in (2, 5)])
        assert bar_reads == [(3, True), (6, True)], (name, bar_reads)  # once after each log step, its values


def test_dpo_encodes_a_t5_pairs_shared_prompt_once_with_the_same_logits_and_gradients(tiny_tokenizer):
    """preference_logits runs T5's encoder on half the rows (both answers of a pair share the prompt): the logits and
    every gradient equal two encoder passes', the FLOPs count the encoder once, and a batch whose halves differ is
    refused by its collator."""
    from lightning_modules.dpo import preference_logits
    from lmlab.core.collate import PreferenceCollator, Seq2SeqCollator
    from lmlab.core.models import flops_per_batch

    model = tiny_model("t5-tiny", tiny_tokenizer).train()
    g = torch.Generator().manual_seed(0)

    def sample(n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.randint(3, 50, (n_in,), generator=g),
            "labels": torch.randint(3, 50, (n_out,), generator=g),
        }

    items = []
    for n_in, n_out in ((7, 4), (3, 6)):
        chosen, rejected = sample(n_in, n_out), sample(n_in, n_out + 1)
        rejected["input_ids"] = chosen["input_ids"]
        items.append({"chosen": chosen, "rejected": rejected})
    batch = PreferenceCollator(Seq2SeqCollator(tiny_tokenizer.pad_token_id))(items)
    outs = []
    for forward in (preference_logits, lambda m, b: lm_forward(m, b, with_loss=False).logits):
        model.zero_grad()
        logits = forward(model, batch)
        (logits.float().log_softmax(-1).amax(-1) * (batch["labels"] != -100)).sum().backward()
        outs.append((logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (once, once_grads), (twice, twice_grads) = outs
    torch.testing.assert_close(once, twice)
    assert once_grads.keys() == twice_grads.keys()
    for name, grad in twice_grads.items():
        torch.testing.assert_close(once_grads[name], grad, msg=name)

    rows, shapes = batch["input_ids"].shape[0], (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))

    def encoder_flops(n: int) -> float:  # what n encoder rows add to the batch's count
        return flops_per_batch(model, *shapes) - flops_per_batch(model, *shapes, encoder_rows=rows - n)

    assert encoder_flops(rows) > 0
    assert encoder_flops(rows // 2) == pytest.approx(encoder_flops(rows) / 2)

    items[1]["rejected"] = sample(3, 5)
    with pytest.raises(ValueError, match="pair 1 of the batch: its chosen and rejected answers have other encoder"):
        PreferenceCollator(Seq2SeqCollator(tiny_tokenizer.pad_token_id))(items)


def test_cudnn_sdpa_safe_forbids_cudnn_only_at_the_lengths_of_its_bug(tiny_tokenizer, monkeypatch):
    """cudnn_sdpa=safe: SDPA may use cuDNN attention except where a query or key length is 64 mod 128, where its
    backward returns NaN gradients (pytorch#196678; tests/test_gpu.py checks the kernels on a GPU). Off everywhere, a
    compiled LLaMA on an H200 ran the memory-efficient kernel, 10% slower. After the block (a run) the process has
    torch's and transformers' own attention again. A value that is none of the three is refused by name."""
    from transformers import AttentionInterface

    from lmlab.core.models import sdpa_settings

    model = tiny_model("llama-tiny", tiny_tokenizer)
    allowed = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    before = torch.backends.cuda.cudnn_sdp_enabled(), AttentionInterface()["sdpa"]

    def spy(query, *args, **kwargs):
        allowed.append((query.shape[-2], torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for mode in ("safe", False, True):
        with sdpa_settings(mode, varlen=False), torch.no_grad():
            for length in (64, 128, 192):
                model(input_ids=torch.randint(3, 50, (1, length)), use_cache=False)
        assert (torch.backends.cuda.cudnn_sdp_enabled(), AttentionInterface()["sdpa"]) == before, mode
    with (
        pytest.raises(ValueError, match=r"cudnn_sdpa='on': one of true, false, safe"),
        sdpa_settings("on", varlen=False),
    ):
        pass
    layers = model.config.num_hidden_layers
    modes = ((False, True, False), (False,) * 3, (True,) * 3)  # safe, false, true at lengths 64, 128, 192
    expected = [(n, on) for allowed_at in modes for n, on in zip((64, 128, 192), allowed_at, strict=True)]
    assert allowed == [call for call in expected for _ in range(layers)]


def test_sample_generations_run_eager_under_compile(tiny_tokenizer, tmp_path):
    """The validation generations (callbacks.samples) leave the compiled model's graphs alone: each decoding step has
    another shape, which under compile would be a graph traced (under reduce-overhead, a CUDA graph recorded) for a
    few forward passes. The model is compiled with a backend that counts the graphs it is handed."""
    from types import SimpleNamespace

    from torch._dynamo.testing import CompileCounter

    from lmlab.train.callbacks import SampleGenerations

    model, counter = tiny_model("llama-tiny", tiny_tokenizer), CompileCounter()
    model.compile(backend=counter)
    datamodule = SimpleNamespace(
        tokenizer=tiny_tokenizer, sample_pairs=lambda n: [("<|user|>\nhi\n<|assistant|>\n", None)] * n
    )
    datamodule.sample_images = lambda n: None
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, datamodule=datamodule, global_step=3)
    generation = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}
    callback = SampleGenerations(str(tmp_path / "samples.jsonl"), 2, 2, None, generation)
    callback.on_validation_epoch_end(trainer, SimpleNamespace(model=model))
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    assert counter.frame_count == 0
    model(input_ids=torch.tensor([[5, 6, 7]]))  # the training path still goes through the compiler
    assert counter.frame_count == 1


def test_lightnings_switch_turns_the_bar_off(tmp_path, capsys):
    """``trainer.enable_progress_bar=false`` trains without a bar: Lightning's own switch also turns off lmlab's
    bar (callbacks.progress), where Lightning refused the bar callback and the run stopped at startup."""
    overrides = ["trainer.enable_progress_bar=false", "max_steps=4", "trainer.val_check_interval=2"]
    train(compose_cfg(tmp_path, [*overrides, "callbacks.samples.num_prompts=0"]))
    assert (tmp_path / "hf" / "config.json").is_file()
    shown = capsys.readouterr()
    assert "Epoch 0" not in shown.out + shown.err  # the bar's line (tqdm, on stdout under Lightning)


@pytest.mark.parametrize("shell", [None, "garbage_collection_threshold:0.8", "cuda started"])
def test_a_gpu_run_hands_the_allocator_expandable_segments_unless_the_shell_set_it(
    tmp_path, monkeypatch, caplog, shell
):
    """``cuda_alloc_conf=auto`` hands a GPU run's allocator expandable segments as PYTORCH_CUDA_ALLOC_CONF before CUDA
    starts; a setting from the shell holds, and so does torch's own once CUDA started: the run says its own was not
    applied. On the CPU, or with null, nothing is set. It returns the settings in force."""
    import train as train_module

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):  # set first, so the test's end puts back the
        monkeypatch.setenv(name, "")  # environment as it was, whatever the run sets
        monkeypatch.delenv(name)
    if shell == "cuda started":
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    elif shell:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", shell)
    held = None if shell == "cuda started" else shell
    assert train_module.set_allocator(compose_cfg(tmp_path, [])) == held  # trainer=cpu
    assert train_module.set_allocator(compose_cfg(tmp_path, ["trainer=gpu", "cuda_alloc_conf=null"])) == held
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == held
    in_force = train_module.set_allocator(compose_cfg(tmp_path, ["trainer=gpu"]))  # cuda_alloc_conf=auto
    assert in_force == os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == (held if shell else "expandable_segments:True")
    assert ("expandable_segments:True not applied" in caplog.text) == bool(shell)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_each_optimizer_step_not_after_the_next_forward(tmp_path, accumulate):
    """A step's forward starts with no gradients held (Lightning would free them only after that forward: the
    model's size in fp32 on top of the forward's peak); the micro-batches of one step still accumulate theirs."""
    from lightning.pytorch import Callback

    held = []

    class Gradients(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            held.append(any(p.grad is not None for p in module.parameters()))

    train_with_probe(
        compose_cfg(tmp_path, ["max_steps=3", f"trainer.accumulate_grad_batches={accumulate}"]), Gradients()
    )
    assert held == ([False] * 3 if accumulate == 1 else [False, True] * 3)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_an_aligned_lm_head_gives_the_plain_heads_logits_loss_and_gradients_and_exports_a_plain_model(
    tiny_tokenizer, tmp_path, name
):
    """The head computed from zero-padded rows (a vocabulary no multiple of 64, as GPT-2's 50257) gives the same
    logits, loss and gradients through Hugging Face's own losses (which view the logits as [-1, vocab]); a tied head
    stays tied, the state dict keeps its keys, and the saved model loads with a plain nn.Linear head."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from lmlab.core.models import AlignedHead, align_lm_head

    plain = tiny_model(name, tiny_tokenizer).train()
    vocab = plain.get_output_embeddings().out_features
    assert vocab % 64, f"the tiny tokenizer's {vocab} tokens would leave nothing to align"
    aligned = copy.deepcopy(plain)
    assert align_lm_head(aligned, 64)
    head = aligned.get_output_embeddings()
    assert type(head) is AlignedHead and head.weight.shape == (vocab, plain.config.hidden_size)

    def tied(model) -> bool:
        return model.get_output_embeddings().weight is model.get_input_embeddings().weight

    assert tied(aligned) == tied(plain)
    assert list(aligned.state_dict()) == list(plain.state_dict())
    padded = vocab + (-vocab % 64)
    assert head(torch.zeros(1, 2, plain.config.hidden_size)).stride()[:2] == (2 * padded, padded)  # computed padded

    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs = [model(input_ids=ids, labels=ids, use_cache=False) for model in (plain, aligned)]
    for output in outputs:
        output.loss.backward()
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, atol=1e-6, rtol=1e-6)
    for (key, p), q in zip(plain.named_parameters(), aligned.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=key)

    aligned.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if plain.config.is_encoder_decoder else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded.get_output_embeddings()) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, labels=ids).logits, aligned.eval()(input_ids=ids, labels=ids).logits
        )


def test_an_aligned_head_with_a_bias_gives_the_plain_ones_outputs_and_gradients():
    from lmlab.core.models import AlignedHead

    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 100)
    aligned = copy.deepcopy(plain)
    aligned.__class__, aligned.multiple = AlignedHead, 64
    x = torch.randn(3, 5, 16)
    outputs = [head(x) for head in (plain, aligned)]
    assert outputs[1].stride()[:2] == (5 * 128, 128)
    weights = torch.randn(3, 5, 100)
    for output in outputs:
        (output * weights).sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(aligned.weight.grad, plain.weight.grad)
    torch.testing.assert_close(aligned.bias.grad, plain.bias.grad)


def test_align_lm_head_leaves_aligned_vocabularies_classifiers_and_null_alone_and_refuses_bad_values(
    tiny_tokenizer,
):
    from lmlab.core.models import align_lm_head

    model = tiny_model("gpt2-tiny", tiny_tokenizer)
    vocab = model.get_output_embeddings().out_features
    assert not align_lm_head(model, None)
    assert not align_lm_head(model, vocab)  # already a multiple
    for bad in (0, -64, True, 64.0):
        with pytest.raises(ValueError, match="align_lm_head="):
            align_lm_head(model, bad)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=gpt2-tiny"])
    classifier = build_model(cfg.model, tiny_tokenizer, labels=["ham", "spam"])
    assert not align_lm_head(classifier, 64)


@pytest.mark.parametrize("multiple", [96, None])
def test_a_run_trains_with_the_head_align_lm_head_asks_for(tmp_path, multiple):
    """train.py aligns the head as conf/train.yaml says (null: the plain head; the tiny run's 512 tokens are a
    multiple of the default 64, so 96 asks for it here)."""
    from lightning.pytorch import Callback

    heads = []

    class Head(Callback):
        def on_train_start(self, trainer, module):
            heads.append(type(module.model.get_output_embeddings()).__name__)

    train_with_probe(
        compose_cfg(tmp_path, ["max_steps=1", f"align_lm_head={'null' if multiple is None else multiple}"]), Head()
    )
    assert heads == ["AlignedHead" if multiple else "Linear"]
