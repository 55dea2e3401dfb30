"""DPO's reference, built outside the module and injected: frozen, eval-mode, outside the module's state and
optimizer; with reference=precomputed its log-probs travel in the items and batches (TRL's ref_chosen_logps /
ref_rejected_logps), equal to what the live reference computes, and a resumed run reads them from the cache
without calling the reference model. Under DDP the ranks share the reference's pass over the pairs, every rank
gets all the log-probs, and rank 0 alone reads and writes the cache."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_cfg, tiny_bpe
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_nan_guard import ddp_trainer, run_ranks
from transformers.pytorch_utils import Conv1D

import train as train_script
from lightning_modules import dpo
from lightning_modules.dpo import DPOModule, build_reference
from lmlab.core.collate import IGNORE_INDEX, REF_LOGPS, CausalCollator, PreferenceCollator
from lmlab.core.models import align_lm_head, build_model, export_hf

DPO = ["stage=dpo", "callbacks.samples.num_prompts=0", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo_ref") / "pairs.jsonl"
    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parts(tmp_path, tokenizer, overrides=()):
    """(datamodule, policy, reference, module) wired as train.py's build_module wires them, from the given tokenizer:
    the reference built and injected (the LM head left unaligned: these tests are about the reference)."""
    cfg = compose_cfg(tmp_path, [*DPO, *overrides])
    dm = instantiate(cfg.data)
    train_script.connect_data(cfg, dm, tokenizer)
    policy = build_model(cfg.model, tokenizer).train()
    reference = build_reference(policy)
    module = instantiate(
        cfg.stage.module,
        model=policy,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        reference_model=reference,
        _recursive_=False,
        _convert_="all",
    )
    return dm, policy, reference, module


def cpu_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


def test_the_policys_logits_are_freed_before_the_live_reference_runs(tmp_path, pairs_file, tiny_tokenizer, monkeypatch):
    """The live reference runs before the policy in each step, as in TRL, and its logits are gone when the policy
    runs: no two [2B, T, vocab] logits tensors are alive at once (the policy's are kept for the backward; the
    reference's, run after them, added a second at the step's peak). With the logits formed (the default): the
    fused head (``fused_lm_head``) forms none."""
    import weakref

    logits_of = {True: [], False: []}  # reference (frozen) and policy logits, as weak references
    alive_at = {True: [], False: []}  # at each forward, how many of the other model's logits are alive
    forward = dpo.preference_logits

    def spy(model, batch):
        frozen = not any(p.requires_grad for p in model.parameters())
        alive_at[frozen].append(sum(ref() is not None for ref in logits_of[not frozen]))
        logits = forward(model, batch)
        logits_of[frozen].append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(dpo, "preference_logits", spy)
    overrides = [f"data.train_files=[{pairs_file}]", "stage.module.fused_lm_head=false"]
    dm, _, _, module = parts(tmp_path, tiny_tokenizer, overrides)
    cpu_trainer(max_steps=3, limit_val_batches=0).fit(module, datamodule=dm)
    assert alive_at == {True: [0, 0, 0], False: [0, 0, 0]}


def test_injected_reference_is_frozen_eval_mode_and_outside_state_dict_and_optimizer(
    tmp_path, pairs_file, tiny_tokenizer
):
    dm, policy, reference, module = parts(tmp_path, tiny_tokenizer, [f"data.train_files=[{pairs_file}]"])
    assert reference is not policy and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters(), strict=True))
    assert not {id(p) for p in reference.parameters()} & {id(p) for p in policy.parameters()}
    assert module.reference is reference
    assert "reference_model" not in module.hparams
    assert all(k.startswith("model.") for k in module.state_dict())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)  # fit puts the module's children in train mode: the reference is none of them
    assert module.reference is reference and not reference.training
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for p in reference.parameters()}


def test_reference_from_a_folder_and_its_vocabulary(tmp_path, tiny_tokenizer):
    cfg = compose_cfg(tmp_path, [*DPO])
    policy = build_model(cfg.model, tiny_tokenizer)
    torch.manual_seed(1)
    other = build_model(cfg.model, tiny_tokenizer)
    export_hf(other, tiny_tokenizer, tmp_path / "other")
    reference = build_reference(policy, str(tmp_path / "other"))
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in reference.state_dict().items())
    other.resize_token_embeddings(len(tiny_tokenizer) + 8)
    export_hf(other, tiny_tokenizer, tmp_path / "wider")
    with pytest.raises(ValueError, match="vocabulary differs"):
        build_reference(policy, str(tmp_path / "wider"))
    # the module never loads a reference from disk: ref_from's model comes in as reference_model
    with pytest.raises(ValueError, match="reference_model=build_reference"):
        DPOModule(policy, {}, beta=0.1, ref_from=str(tmp_path / "other"))


def test_train_py_injects_the_reference_of_ref_from(tmp_path, tiny_tokenizer):
    cfg = compose_cfg(tmp_path, [*DPO, f"ref_from={tmp_path / 'ref'}"])
    policy = build_model(cfg.model, tiny_tokenizer)
    export_hf(policy, tiny_tokenizer, tmp_path / "ref")
    (injected,) = train_script.reference_model(cfg, policy).values()
    assert not injected.training and all(
        torch.equal(a, b) for a, b in zip(policy.parameters(), injected.parameters(), strict=True)
    )
    # with the policy's head aligned as build_module aligns it, ref_from's reference and a copy are aligned alike
    # (DPO's fused head pads each to its head's multiple: answer_logps)
    assert align_lm_head(policy, cfg.align_lm_head)
    for with_ref_from in (cfg, compose_cfg(tmp_path, DPO)):
        (reference,) = train_script.reference_model(with_ref_from, policy).values()
        assert reference.get_output_embeddings().multiple == policy.get_output_embeddings().multiple
    assert train_script.reference_model(compose_cfg(tmp_path, ["stage=sft"]), policy) == {}


def test_build_module_aligns_the_dpo_policy_and_its_live_reference_alike(tmp_path, pairs_file):
    """build_module, which train.py runs and benchmarks/dpo_throughput.py times, aligns the policy's LM head
    (align_lm_head) before the live reference copies it: both heads pad alike in DPO's fused head."""
    cfg = compose_cfg(tmp_path, [*DPO, "model=gpt2-tiny", f"data.train_files=[{pairs_file}]"])
    module, *_ = train_script.build_module(cfg, tmp_path)
    policy, reference = module.model.get_output_embeddings(), module.reference.get_output_embeddings()
    assert policy.out_features % cfg.align_lm_head  # a vocabulary the setting pads
    assert policy.multiple == reference.multiple == cfg.align_lm_head


def test_collator_stacks_the_reference_logps_of_the_items():
    sample = {"input_ids": torch.tensor([1, 5, 6, 2]), "labels": torch.tensor([-100, -100, 6, 2])}
    items = [
        {"chosen": sample, "rejected": sample, "ref_chosen_logps": -1.5 * i, "ref_rejected_logps": -2.0 - i}
        for i in range(3)
    ]
    batch = PreferenceCollator(CausalCollator(pad_id=0))(items)
    assert batch["ref_chosen_logps"].dtype == torch.float32 and batch["ref_chosen_logps"].tolist() == [0, -1.5, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.0, -4.0]
    plain = PreferenceCollator(CausalCollator(pad_id=0))(
        [{k: v for k, v in it.items() if k not in REF_LOGPS} for it in items]
    )
    assert not set(REF_LOGPS) & set(plain)


def test_precomputed_batches_carry_the_live_reference_logps(tmp_path, pairs_file, tiny_tokenizer):
    """Also the path of a plain trainer.validate(): the log-probs are in place before its first batch is fetched."""
    cache = tmp_path / "ref_logps"  # the stage's ref_cache: <run>/ref_logps
    dm, _, reference, module = parts(
        tmp_path, tiny_tokenizer, [f"data.train_files=[{pairs_file}]", "stage.module.reference=precomputed"]
    )
    (metrics,) = cpu_trainer().validate(module, datamodule=dm)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert module.reference is None, "the reference model is freed once its log-probs are with the data"
    assert (cache / "train.pt").is_file() and (cache / "val.pt").is_file()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        with torch.no_grad():
            live = module._logps(reference, batch)[0].chunk(2)
        for key, expected in zip(REF_LOGPS, live, strict=True):
            assert batch[key].shape == (batch["input_ids"].shape[0] // 2,)  # one per pair
            torch.testing.assert_close(batch[key], expected, rtol=1e-5, atol=1e-5)
        # the step reads them from the batch: the reference model is gone
        assert all(torch.equal(a, b) for a, b in zip(module._reference_logps(batch), live, strict=True))


def test_resumed_run_reads_the_cache_and_never_calls_the_reference(tmp_path, pairs_file, monkeypatch, caplog):
    calls = []
    build = train_script.build_reference

    def counted(policy, ref_from=None):
        reference = build(policy, ref_from)
        reference.base_model.register_forward_pre_hook(lambda *_: calls.append(1))  # fused head too
        return reference

    monkeypatch.setattr(train_script, "build_reference", counted)
    overrides = [
        *DPO,
        f"data.train_files=[{pairs_file}]",
        "stage.module.reference=precomputed",
        "trainer.val_check_interval=4",
        "checkpoint_every=4",
        "resume=auto",
    ]
    train_script.train(compose_cfg(tmp_path, [*overrides, "max_steps=4"]))
    assert calls, "the first run computes the reference log-probs"
    cache = {split: (tmp_path / "ref_logps" / f"{split}.pt").stat().st_mtime_ns for split in ("train", "val")}
    calls.clear()
    with caplog.at_level(logging.INFO):
        train_script.train(compose_cfg(tmp_path, [*overrides, "max_steps=8"]))
    assert "resume=auto: resuming" in caplog.text and "reference log-probs: train from" in caplog.text
    assert not calls, "a resumed run must take the reference log-probs from its cache"
    assert cache == {split: (tmp_path / "ref_logps" / f"{split}.pt").stat().st_mtime_ns for split in cache}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert "reference_model" not in ckpt["hyper_parameters"]
    assert all(k.startswith("model.") for k in ckpt["state_dict"])


def _precompute(tmp_path, pairs_file, trainer: L.Trainer) -> dict:
    """trainer.validate() with reference=precomputed, its ref_cache <tmp_path>/ref_logps, the policy (and so the
    reference) from seed 0: how often this process ran the reference and wrote a cache file, the batches of each
    split, and the log-probs of the train and val pairs its datamodule got ([n, 2], the items' fields)."""
    calls, writes = [], []
    write = dpo.write_atomically

    def counted_write(path, *args):
        writes.append(Path(path).name)
        return write(path, *args)

    overrides = [
        f"data.train_files=[{pairs_file}]",
        "stage.module.reference=precomputed",
        "data.val_fraction=0.25",
        "batch_size=4",  # 27 train and 9 val pairs: 7 and 3 batches, the last of each short
    ]
    torch.manual_seed(0)
    dm, _, reference, module = parts(tmp_path, tiny_bpe("byte"), overrides)
    reference.base_model.register_forward_pre_hook(lambda *_: calls.append(1))  # fused head too
    dpo.write_atomically = counted_write
    try:
        trainer.validate(module, datamodule=dm)
    finally:
        dpo.write_atomically = write
    splits = {"train": dm.train_set, "val": dm.val_set}
    return {
        "reference_calls": len(calls),
        "writes": sorted(writes),
        "batches": {split: math.ceil(len(dataset) / dm.batch_size) for split, dataset in splits.items()},
        "logps": {
            split: torch.tensor([[s[key] for key in REF_LOGPS] for s in dataset.samples])
            for split, dataset in splits.items()
        },
    }


def _precompute_on_ranks(rank: int, tmp_path, pairs_file) -> dict:
    """One rank of a 2-rank DDP run of :func:`_precompute`, both ranks on one ref_cache."""
    return _precompute(tmp_path, pairs_file, ddp_trainer(tmp_path, limit_val_batches=1))


def _precompute_in_one_process(tmp_path, pairs_file) -> dict:
    return _precompute(tmp_path, pairs_file, cpu_trainer(limit_val_batches=1))


def test_under_ddp_the_ranks_share_the_reference_pass_and_rank_0_alone_caches(tmp_path, pairs_file):
    """Rank 0 alone used to run the reference over every pair while rank 1 waited in a broadcast (on a large split,
    past the process group's timeout); now each rank runs it on half the batches and they gather the pieces."""
    single = _precompute_in_one_process(tmp_path / "single", pairs_file)
    results = run_ranks(_precompute_on_ranks, tmp_path / "ddp", pairs_file, out_dir=tmp_path)
    assert all("returned" in result for result in results), results
    rank0, rank1 = (result["returned"] for result in results)
    batches = single["batches"]
    assert single["reference_calls"] == sum(batches.values()) and min(batches.values()) >= 2
    # batches 0, 2, 4, ... of each split on rank 0, batches 1, 3, ... on rank 1: one pass over the data in all
    assert rank0["reference_calls"] == sum(math.ceil(n / 2) for n in batches.values())
    assert rank1["reference_calls"] == sum(n // 2 for n in batches.values())
    assert rank0["writes"] == ["train.pt", "val.pt"] and rank1["writes"] == [], "rank 0 alone writes the cache"
    for split in ("train", "val"):
        assert torch.equal(rank0["logps"][split], rank1["logps"][split]), split
        torch.testing.assert_close(rank0["logps"][split], single["logps"][split], rtol=1e-6, atol=1e-6)
        cached = torch.load(tmp_path / "ddp" / "ref_logps" / f"{split}.pt", weights_only=True)["logps"]
        assert torch.equal(cached, rank0["logps"][split]), "the cache holds the log-probs in the dataset's order"


def test_under_ddp_a_valid_cache_is_read_and_no_rank_runs_the_reference(tmp_path, pairs_file):
    single = _precompute_in_one_process(tmp_path, pairs_file)  # writes <tmp_path>/ref_logps
    cache = {split: (tmp_path / "ref_logps" / f"{split}.pt").stat().st_mtime_ns for split in ("train", "val")}
    results = run_ranks(_precompute_on_ranks, tmp_path, pairs_file, out_dir=tmp_path)
    assert all("returned" in result for result in results), results
    for rank in (result["returned"] for result in results):
        assert rank["reference_calls"] == 0 and rank["writes"] == []
        assert all(torch.equal(rank["logps"][split], single["logps"][split]) for split in cache)
    assert cache == {split: (tmp_path / "ref_logps" / f"{split}.pt").stat().st_mtime_ns for split in cache}


@pytest.mark.parametrize(
    "name, untied",
    [("gpt2-tiny", False), ("llama-tiny", False), ("llama-tiny", True), ("llama-moe-tiny", False), ("t5-tiny", False)],
)
def test_a_reference_with_its_linear_layers_stored_in_bf16_gives_the_same_outputs_under_autocast(
    tmp_path, tiny_tokenizer, name, untied
):
    """Autocast casts a linear layer's float32 weights to bf16 at every call, so a frozen model whose linear layers
    hold them in bf16 gives bit-identical logits, and answer log-probs with the head fused or not, under bf16
    autocast; embeddings, norms and a tied head stay fp32. Cast for one dtype, it refuses another or none."""
    from lmlab.core.models import cast_frozen_linears

    overrides = [f"model={name}"] + (["model.config.tie_word_embeddings=false"] if untied else [])
    cfg = compose_cfg(tmp_path, overrides)
    torch.manual_seed(0)
    reference = build_reference(build_model(cfg.model, tiny_tokenizer))
    cast = build_reference(reference)
    embeddings = cast.get_input_embeddings().weight
    assert (cast.get_output_embeddings().weight is embeddings) == (not untied)
    expected = sum(
        2 * p.numel()
        for m in cast.modules()
        if isinstance(m, torch.nn.Linear | Conv1D)
        for p in m.parameters(recurse=False)
        if p is not embeddings
    )
    assert cast_frozen_linears(cast, torch.bfloat16) == expected > 0
    assert cast_frozen_linears(cast, torch.bfloat16) == 0  # once is enough
    assert embeddings.dtype == torch.float32
    assert {p.dtype for n, p in cast.named_parameters() if "norm" in n or "ln_" in n} == {torch.float32}
    if untied:
        assert cast.get_output_embeddings().weight.dtype == torch.bfloat16
    for other in (torch.float16, None):
        with pytest.raises(ValueError, match="stored in torch.bfloat16"):
            cast_frozen_linears(cast, other)

    ids = torch.randint(3, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [model(input_ids=ids, labels=ids).logits for model in (reference, cast)]
        assert torch.equal(outputs[1], outputs[0])
        if not cast.config.is_encoder_decoder:
            for fused in (False, True):
                logps = [dpo.answer_logps(m, {"input_ids": ids, "labels": labels}, fused)[0] for m in (reference, cast)]
                assert torch.equal(logps[1], logps[0])


def test_cast_frozen_linears_refuses_a_trainable_model(tmp_path, tiny_tokenizer):
    from lmlab.core.models import cast_frozen_linears

    policy = build_model(compose_cfg(tmp_path, []).model, tiny_tokenizer)
    with pytest.raises(ValueError, match="trainable"):
        cast_frozen_linears(policy, torch.bfloat16)


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_the_live_reference_runs_with_its_linear_layers_in_the_autocast_dtype(
    tmp_path, pairs_file, tiny_tokenizer, precision, dtype
):
    """Under bf16-mixed the reference is cast before its first forward (the sanity check's validation), under
    32-true it is left as it is; the policy trains in fp32 either way."""
    dm, policy, reference, module = parts(tmp_path, tiny_tokenizer, [f"data.train_files=[{pairs_file}]"])
    cpu_trainer(max_steps=2, limit_val_batches=1, precision=precision).fit(module, datamodule=dm)
    embeddings = reference.get_input_embeddings().weight
    linears = {m.weight.dtype for m in reference.modules() if type(m) is torch.nn.Linear and m.weight is not embeddings}
    assert linears == {dtype} and embeddings.dtype == torch.float32
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
