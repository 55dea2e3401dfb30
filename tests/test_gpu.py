"""GPU path: bf16-mixed, fused AdamW, compile; tokens/s and MFU logged; a classifier in bf16. Skipped without CUDA."""

from __future__ import annotations

import copy
import csv
import functools
import importlib.util
import sys

import pytest
import torch
from conftest import REPO, compose_cfg

from lmlab.core.kernels import KERNELS, apply_kernels
from lmlab.core.models import build_model
from train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model, compile", [("llama-tiny", False), ("llama-tiny", True), ("t5-tiny", False)])
def test_gpu_run_learns_and_logs_throughput_and_mfu(tmp_path, model, compile):
    text = tmp_path / "rep.txt"
    text.write_text("\n".join(["the cat sat on the mat and the dog sat on the log."] * 400))
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "trainer=gpu",
            f"model={model}",
            f"compile={compile}",
            f"data.train_files=[{text}]",
            "max_steps=40",
            "lr=1e-2",
            "trainer.log_every_n_steps=1",
            "callbacks.throughput.window_size=5",
        ],
    )
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    tokens_per_sec = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    assert losses[-1] < losses[0] / 2
    assert tokens_per_sec and min(tokens_per_sec) > 0
    assert mfu and 0 < max(mfu) < 1


def test_gpu_classifier_learns_in_bf16(tmp_path):
    """stage=classify under bf16-mixed with fused AdamW: the bundled ham/spam messages, tested on the best
    checkpoint."""
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "trainer=gpu",
            "stage=classify",
            "stage.module.trainable=all",
            "max_steps=60",
            "batch_size=16",
            "trainer.val_check_interval=20",
        ],
    )
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(next(r["test/acc"] for r in rows if r.get("test/acc"))) > 0.95


liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason='needs pip install -e ".[kernels]"')


@pytest.fixture(autouse=True)
def unpatched_llama(monkeypatch):
    """Liger patches transformers' llama module for the whole process (lmlab.core.kernels): put back what it
    replaces after each test, so later tests build plain LLaMAs (on the CPU too)."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


@liger
def test_liger_kernels_give_the_plain_loss_and_gradients(tmp_path, tiny_tokenizer):
    """Every Liger kernel on (lmlab.core.kernels) on a copy of a tiny LLaMA: the fused loss forms no logits and
    gives the plain model's loss and gradients."""
    model = build_model(compose_cfg(tmp_path, ["model=llama-tiny"]).model, tiny_tokenizer).cuda()
    fused = copy.deepcopy(model)
    ids = torch.randint(3, len(tiny_tokenizer), (4, 96), generator=torch.Generator().manual_seed(0)).cuda()
    plain = model(input_ids=ids, labels=ids)
    plain.loss.backward()
    assert apply_kernels(fused, dict.fromkeys(KERNELS, True)) == list(KERNELS)
    out = fused(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)


@liger
def test_gpu_run_with_liger_kernels_learns(tmp_path):
    """train.py with every kernels.* switch on: the run learns and logs (train/acc is left out: no logits)."""
    text = tmp_path / "rep.txt"
    text.write_text("\n".join(["the cat sat on the mat and the dog sat on the log."] * 400))
    kernels = [f"kernels.{k}=true" for k in KERNELS]
    overrides = ["trainer=gpu", f"data.train_files=[{text}]", "max_steps=40", "lr=1e-2", "trainer.log_every_n_steps=1"]
    cfg = compose_cfg(tmp_path / "run", [*overrides, *kernels])
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < losses[0] / 2


@pytest.mark.parametrize("length", [704, 768])
def test_cudnn_sdpa_safe_keeps_the_bug_length_off_cudnn_and_the_rest_on_it(length):
    """pytorch#196678: cuDNN attention's backward gives NaN query gradients for a masked attention over a length
    64 mod 128 whose logits are all about -120 (benchmarks/sdpa_cudnn_probe.py's repro, run here). cudnn_sdpa=safe's
    sdpa attention gives finite ones there and runs cuDNN at other lengths (the speed of a compiled LLaMA depends on
    it)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sdpa_cudnn_probe import torch_only

    nonfinite, used_cudnn = torch_only(length, "safe")
    assert nonfinite == 0
    assert used_cudnn == (length % 128 != 64)


def test_compiled_head_label_logps_equal_the_eager_ones():
    """DPO's fused LM head under compile=true (lmlab.core.losses: the chunks' element-wise work compiled, dynamic
    shapes): the log-probs and the gradients of the hidden states and the head are the eager ones, at a vocabulary
    of GPT-2's size (the head padded to 64 rows, as align_lm_head's default pads it), under bf16 autocast, for two
    numbers of label positions (one compiled graph serves both). Both agree with the formed logits' label_logps (the
    head's fp32 gradient summed by cuBLAS straight from bf16 factors, _add_product's GPU path), to bf16's
    precision."""
    from lmlab.core.losses import head_label_logps, label_logps

    g = torch.Generator().manual_seed(0)
    for answer in (100, 37):
        hidden, weight = torch.randn(4, 128, 64, generator=g).cuda(), torch.randn(50257, 64, generator=g).cuda() / 8
        labels = torch.randint(0, 50257, (4, 128), generator=g).cuda()
        labels[:, :-answer] = -100
        positions = labels.flatten().ne(-100).nonzero().squeeze(1)
        results = []
        for compile in (False, True, None):  # None: the formed logits
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if compile is None:
                    logps = label_logps(h @ w.T, labels)
                else:
                    logps, _ = head_label_logps(
                        h, w, labels, positions, chunk_elements=2**22, compile=compile, multiple=64
                    )
            (logps * torch.linspace(-1, 1, 128, device="cuda")).sum().backward()
            assert w.grad.dtype == torch.float32
            results.append((logps, h.grad, w.grad))
        for eager, compiled, formed in zip(*results, strict=True):
            torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(eager, formed, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_varlen_packed_rows_equal_the_padded_batch_eager_and_compiled(family, monkeypatch):
    """packed_attention=varlen with torch's own kernel: a packed row's logits and gradients equal the padded batch's
    (bf16 autocast), with samples longer and shorter than a 128-token block, with and without a padding tail (an
    empty last segment), eager, compiled and replayed as CUDA graphs (compile=reduce-overhead: two widths, each
    recorded, then replayed; inductor skips no graph); llama's and mistral's attention have 2 query heads per key
    head, mistral's a sliding window of 4. Each eager packed forward calls the kernel once per layer."""
    from test_packing import tiny
    from torch._dynamo.utils import counters

    from lightning_modules.lm import lm_forward
    from lmlab.core import models
    from lmlab.core.collate import CausalCollator, PackedCausalCollator
    from lmlab.core.models import sdpa_settings

    calls, kernel = [], models.varlen_attn

    @functools.wraps(kernel)  # its signature, which sdpa_settings checks
    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(models, "varlen_attn", counted)

    g = torch.Generator().manual_seed(0)
    model = tiny(family, "sdpa", positions=512).cuda().train()
    if family == "llama":
        assert model.config.num_key_value_heads < model.config.num_attention_heads
    compiled, graphed = torch.compile(model), torch.compile(model, mode="reduce-overhead")
    counters.clear()
    for lengths, multiple in (([130, 3, 257, 64], 64), ([40, 300, 9], 1)):
        samples = [{"input_ids": (ids := torch.randint(1, 50, (n,), generator=g)), "labels": ids} for n in lengths]
        padded = {k: v.cuda() for k, v in CausalCollator(pad_id=0)(samples).items()}
        packed = PackedCausalCollator(pad_id=0, pad_to_multiple_of=multiple)(samples)
        packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
        results = []
        # CUDA graphs: a shape's first step runs unrecorded, its second records, its third replays the recording
        for net, batch, steps in ((model, padded, 1), (model, packed, 1), (compiled, packed, 1), (graphed, packed, 3)):
            for _ in range(steps):
                net.zero_grad()
                calls.clear()
                with sdpa_settings("safe", varlen=True), torch.autocast("cuda", dtype=torch.bfloat16):
                    out = lm_forward(net, batch, with_loss=True)
                out.loss.backward()
            if net is model:
                assert len(calls) == (model.config.num_hidden_layers if batch is packed else 0)
            logits = out.logits.float()
            if batch is packed:  # back into the padded batch's rows
                rows = logits[0].split([*packed["document_lengths"], logits.shape[1] - sum(packed["document_lengths"])])
                logits = torch.nn.utils.rnn.pad_sequence(rows[:-1], batch_first=True)[:, : padded["labels"].shape[1]]
            real = padded["labels"].ne(-100)
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results.append((out.loss.detach(), logits[real], grads))
        (loss, logits, grads), *others = results
        for other_loss, other_logits, other_grads in others:
            torch.testing.assert_close(other_loss, loss, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(other_logits, logits, rtol=2e-2, atol=3e-2)
            assert (other_grads - grads).norm() < 2e-2 * grads.norm()
    assert counters["inductor"]["cudagraph_skips"] == 0  # the graphed model ran as CUDA graphs, not just compiled


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_an_aligned_head_gives_the_plain_loss_and_gradients_compiled_in_bf16(mode):
    """align_lm_head at GPT-2's 50257 under bf16 autocast and torch.compile (CUDA graphs too): the loss and the
    gradients are the plain head's, up to bf16 rounding (the kernels differ)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.core.models import align_lm_head

    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # the two models' masks would differ
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(
        GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=2, n_positions=128, **no_dropout)
    ).cuda()
    aligned = copy.deepcopy(plain)
    assert align_lm_head(aligned, 64)
    ids = torch.randint(0, 50257, (4, 128), device="cuda")
    results = []
    for model in (plain, aligned):
        model.compile(mode=mode)
        for _ in range(3):  # CUDA graphs record after warm-up calls
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        results.append((loss.detach().clone(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_plain, grads_plain), (loss_aligned, grads_aligned) = results
    torch.testing.assert_close(loss_aligned, loss_plain, rtol=2e-3, atol=0)
    assert (grads_aligned - grads_plain).norm() < 2e-2 * grads_plain.norm()  # as the packing test above
