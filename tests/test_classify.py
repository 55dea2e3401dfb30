"""stage=classify: last-token pooling, freeze policies, balancing and splits, thresholds, bad labels, learning, export,
predict."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import REPO, SHARED_DATA, compose_cfg, hydra_job, run_script
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import eval as eval_cli
import predict as predict_cli
import prepare as prepare_cli
from datamodules.classification import ClassificationCollator, split_examples, to_labelled, undersample
from datamodules.formats import DataError
from lightning_modules.classifier import (
    ClassifierModule,
    choose_threshold,
    decide,
    exported_threshold,
    positive_log_odds,
    scalar_metrics,
)
from lmlab.core.models import build_model
from lmlab.train.callbacks import ConfusionReport
from train import connect_data, train

TEXTS = ["Add the two numbers.", "What is 5 plus 6? It is 11.", "你好"]


def tiny_classifier(tokenizer, model: str = "llama-tiny", labels=("a", "b", "c")):
    with_model = compose_cfg(REPO / "outputs" / "unused", [f"model={model}", "stage=classify"])
    return build_model(with_model.model, tokenizer, list(labels)).eval()


@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_reads_the_last_real_token(model, side, tiny_tokenizer):
    classifier = tiny_classifier(tiny_tokenizer, model)
    samples = [{"input_ids": torch.tensor(tiny_tokenizer(t)["input_ids"]), "label": 0} for t in TEXTS]
    batch = ClassificationCollator(tiny_tokenizer.pad_token_id, side)(samples)
    assert len({len(s["input_ids"]) for s in samples}) == 3  # padding really happens
    with torch.no_grad():
        logits = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        backbone = getattr(classifier, classifier.base_model_prefix)
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # the last position whose attention mask is 1, found without the pad id
    last = torch.tensor([int(row.nonzero().max()) for row in batch["attention_mask"]])
    assert last.tolist() == (
        [len(s["input_ids"]) - 1 for s in samples] if side == "right" else [batch["input_ids"].shape[1] - 1] * 3
    )
    manual = classifier.score(hidden[torch.arange(3), last])
    assert logits.shape == (3, 3)  # multi-class head
    torch.testing.assert_close(logits, manual)


def test_left_and_right_padding_classify_alike_with_rotary_positions(tiny_tokenizer):
    """LLaMA's rotary positions are relative, so the padding side must not change the logits."""
    classifier = tiny_classifier(tiny_tokenizer, "llama-tiny")
    samples = [{"input_ids": torch.tensor(tiny_tokenizer(t)["input_ids"]), "label": 0} for t in TEXTS]
    outputs = []
    for side in ("right", "left"):
        batch = ClassificationCollator(tiny_tokenizer.pad_token_id, side)(samples)
        with torch.no_grad():
            outputs.append(classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


EXPECTED_TRAINABLE = {  # (model, policy): predicate on parameter names
    ("llama-tiny", "head"): lambda n: n == "score.weight",
    ("llama-tiny", "head+last_block"): lambda n: (
        n in ("score.weight", "model.norm.weight") or n.startswith("model.layers.1.")
    ),
    ("gpt2-tiny", "head+last_block"): lambda n: (
        n == "score.weight" or n.startswith(("transformer.h.1.", "transformer.ln_f."))
    ),
    ("llama-tiny", "all"): lambda n: True,
}


@pytest.mark.parametrize("model, policy", sorted(EXPECTED_TRAINABLE))
def test_frozen_parameters_stay_bit_identical(model, policy, tmp_path, tiny_tokenizer):
    cfg = compose_cfg(
        tmp_path, [f"model={model}", "stage=classify", f"stage.module.trainable={policy}", "data.balance=none"]
    )
    datamodule = instantiate(cfg.data)
    connect_data(cfg, datamodule, tiny_tokenizer)
    classifier = build_model(cfg.model, tiny_tokenizer, list(cfg.data.labels))
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    module = instantiate(
        cfg.stage.module,
        model=classifier,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        _recursive_=False,
        _convert_="all",
    )
    L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    ).fit(module, datamodule=datamodule)
    expected = EXPECTED_TRAINABLE[(model, policy)]
    for name, p in classifier.named_parameters():
        if expected(name):
            assert p.requires_grad and not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert not p.requires_grad and torch.equal(p, before[name]), f"{name} should be frozen"


def examples(counts: dict[int, int]) -> list[tuple]:
    return [("f", i, f"text {label} {i}", label) for label, n in counts.items() for i in range(n)]


def test_undersampling_gives_equal_classes_and_a_disjoint_seeded_split():
    balanced = undersample(examples({0: 50, 1: 9, 2: 13}), 3, seed=1)
    assert sorted(e[3] for e in balanced) == [0] * 9 + [1] * 9 + [2] * 9
    assert undersample(examples({0: 50, 1: 9, 2: 13}), 3, seed=1) == balanced  # seeded
    parts = split_examples(balanced, {"val": 0.1, "test": 0.2}, seed=1)
    assert {k: len(v) for k, v in parts.items()} == {"val": 3, "test": 6, "train": 18}  # per class: 1 / 2 / 6
    texts = [{e[2] for e in part} for part in parts.values()]
    assert set.union(*texts) == {e[2] for e in balanced} and sum(map(len, texts)) == len(balanced)


def test_the_split_keeps_each_class_share_and_undersampling_touches_train_only(tmp_path):
    data = examples({0: 410, 1: 63, 2: 7})
    parts = split_examples(data, {"val": 0.1, "test": 0.2}, seed=3)
    counts = {name: [sum(e[3] == c for e in part) for c in range(3)] for name, part in parts.items()}
    assert counts == {"val": [41, 6, 1], "test": [82, 13, 1], "train": [287, 44, 5]}  # round(n * fraction) per class
    assert sorted(e for part in parts.values() for e in part) == sorted(data)
    assert split_examples(data, {"val": 0.1, "test": 0.2}, seed=3) == parts  # seeded
    dm = instantiate(compose_cfg(tmp_path, ["stage=classify", "data.balance=undersample"]).data)  # 612 ham / 188 spam
    assert {s: dm.class_counts(s) for s in ("train", "val", "test")} == {
        "train": [131, 131],
        "val": [61, 19],
        "test": [122, 38],
    }
    natural = instantiate(compose_cfg(tmp_path, ["stage=classify", "data.balance=none"]).data)
    assert natural.splits()["test"] == dm.splits()["test"] and natural.splits()["val"] == dm.splits()["val"]
    assert natural.class_counts("train") == [429, 131]


def test_metrics_from_a_confusion_matrix():
    values = scalar_metrics({"confusion": torch.tensor([[90, 10], [5, 15]])}, ["ham", "spam"])
    expected = {
        "acc": 105 / 120,
        "precision/spam": 15 / 25,
        "recall/spam": 0.75,
        "recall/ham": 0.9,
        "fpr/spam": 10 / 100,
        "fpr/ham": 5 / 20,
        "balanced_acc": (0.9 + 0.75) / 2,
        "balanced_precision/spam": 0.75 / (0.75 + 0.1),
        "f1": (2 * 0.9 * (90 / 95) / (0.9 + 90 / 95) + 2 * 0.75 * 0.6 / 1.35) / 2,
    }
    for name, value in expected.items():
        assert float(values[name]) == pytest.approx(value, rel=1e-6), name


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_fpr", [0.0, 0.02, 0.1])
def test_the_threshold_has_the_highest_recall_within_the_fpr_budget(seed, max_fpr):
    g = torch.Generator().manual_seed(seed)
    is_positive = torch.rand(400, generator=g) < 0.15
    scores = torch.randn(400, generator=g) + 2.0 * is_positive
    scores[:40] = scores[:40].round()  # ties
    t = choose_threshold(scores, is_positive, max_fpr)
    negatives = scores[~is_positive]
    assert (negatives >= t).float().mean() <= max_fpr  # the rule holds
    lower = scores[scores < t].max()  # any lower threshold flags one negative too many
    assert (negatives >= lower).float().mean() > max_fpr
    assert not bool((scores == t).any())  # between scores: a margin on both sides


def test_decide_thresholds_the_positive_class_and_argmaxes_the_rest():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0], [1.0, 0.5, -1.0]])
    assert decide(logits, None, 0.0).tolist() == [0, 2, 0]
    odds = positive_log_odds(logits, 1)
    torch.testing.assert_close(odds, logits.log_softmax(-1)[:, 1] - torch.log1p(-logits.softmax(-1)[:, 1]))
    assert decide(logits, 1, float(odds[2])).tolist() == [0, 2, 1]  # row 2 reaches it, takes class 1
    assert decide(logits, 1, float(odds.min())).tolist() == [1, 1, 1]


def test_class_weights_are_inverse_frequencies(tmp_path, tiny_tokenizer):
    cfg = compose_cfg(tmp_path, ["stage=classify", "data.balance=class_weights"])
    dm = instantiate(cfg.data)
    ham, spam = dm.class_counts("train")
    assert ham > 2 * spam  # the bundled messages are unbalanced and stay so
    weights = dm.class_weights()
    assert weights == pytest.approx([(ham + spam) / (2 * ham), (ham + spam) / (2 * spam)])


def test_an_unknown_label_names_its_file_and_line(tmp_path):
    data = tmp_path / "msgs.tsv"
    data.write_text("ham\thello\nspam\tWIN now\nhamm\ttypo in the label\nham\tsee you\nham\tlunch?\n", encoding="utf-8")
    cfg = compose_cfg(tmp_path, ["stage=classify", f"data.train_files=[{data}]"])
    with pytest.raises(
        DataError, match=r"msgs.tsv:3: field 'label': unknown label 'hamm'; data.labels is \['ham', 'spam'\]"
    ):
        instantiate(cfg.data).splits()
    skipping = instantiate(
        compose_cfg(
            tmp_path,
            [
                "stage=classify",
                f"data.train_files=[{data}]",
                "data.on_error=skip",
                "data.balance=none",
                "data.val_fraction=0.3",
                "data.test_fraction=0.3",
            ],
        ).data
    )
    assert sum(len(part) for part in skipping.splits().values()) == 4 and skipping.skips.total == 1
    assert to_labelled({"text": "x", "label": 1}, "f", 1, "text", "label", ["ham", "spam"]) == ("x", 1)  # an id


def train_classifier(run: Path, overrides: list[str]) -> DictConfig:
    """``python train.py stage=classify logger=csv <overrides>`` into ``run``, trained in this process (the CLI
    itself is tests/test_cli.py's): conf/train.yaml's settings, not conftest's TINY ones. Returns the config."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "stage=classify",
                "logger=csv",
                *overrides,
                f"paths.output_dir={run}",
                f"paths.cache_dir={run.parent}/cache",
            ],
        )
    train(cfg)
    return cfg


@pytest.mark.slow
def test_classifier_learns_tests_the_best_checkpoint_and_exports_what_it_tested(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = train_classifier(
        run,
        [
            "max_steps=60",
            "batch_size=16",
            "seq_len=48",
            "bpe.vocab_size=400",
            "trainer.val_check_interval=20",
            "stage.module.trainable=all",
        ],
    )
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    test = next(r for r in rows if r.get("test/acc"))
    assert float(test["test/acc"]) > 0.95 and float(test["test/f1"]) > 0.95
    val_accs = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_accs) == 3
    assert not (run / "samples.jsonl").exists()  # a classifier generates no text samples
    # the confusion matrices: a CSV whose counts sum to the test split, and a PNG that opens
    with open(run / "confusion_test.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true \\ predicted", "ham", "spam"]
    counts = [[int(x) for x in row[1:]] for row in table[1:]]
    import matplotlib.image

    assert matplotlib.image.imread(run / "confusion_test.png").ndim == 3
    # plain transformers on hf/ reproduces the logged test accuracy on the same split: hf/ is the tested model
    model = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    assert model.config.id2label == {0: "ham", 1: "spam"}
    split = instantiate(cfg.data).splits()["test"]
    assert sum(map(sum, counts)) == len(split)
    batch = tokenizer([text for *_, text, _ in split], truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    labels = torch.tensor([label for *_, label in split])
    assert float((predicted == labels).float().mean()) == pytest.approx(float(test["test/acc"]), abs=1e-6)
    assert sum(counts[i][i] for i in range(2)) == int((predicted == labels).sum())
    # predict.py's task labels stdin lines with the same model (run in this process; the threshold test below runs
    # predict.py itself)
    texts = [text for *_, text, _ in split[:5]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))
    capsys.readouterr()
    with hydra_job("predict", [f"run={run}", "input=-"]) as predict_cfg:
        predict_cli.main(predict_cfg)
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == [model.config.id2label[int(i)] for i in predicted[:5]]
    assert [line.split("\t", 2)[2] for line in out] == texts
    # eval.py's task=classify on the test split agrees with the test the run logged (in this process: eval.py itself
    # runs in tests/test_eval.py)
    eval_overrides = [f"run={run}", "data=sample_classify", "task=classify", "split=test", "wandb.enabled=false"]
    with hydra_job("eval", [*eval_overrides, f"out_dir={tmp_path}/eval"]) as eval_cfg:
        eval_cli.main(eval_cfg)
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["metrics"]["acc"] == pytest.approx(float(test["test/acc"]), abs=1e-6)
    assert record["confusion"] == counts and record["max_length"] == 48


@pytest.mark.slow
def test_prepare_split_writes_the_split_stage_classify_uses(tmp_path):
    """`python prepare.py task=split data=sample_classify split_dir=...`, its task run in this process (prepare.py
    itself runs in tests/test_tokenizer.py)."""
    out = tmp_path / "splits"
    with hydra_job("prepare", ["task=split", "data=sample_classify", f"split_dir={out}"]) as cfg:
        prepare_cli.main(cfg)
    written = {
        name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "val", "test")
    }
    dm = instantiate(compose_cfg(tmp_path, ["stage=classify"]).data)
    for name, rows in written.items():
        assert [(r["text"], r["label"]) for r in rows] == [(t, dm.labels[y]) for *_, t, y in dm.splits()[name]]
    # each class cut 70/10/20 (612 ham: 429/61/122, 188 spam: 131/19/38), then train undersampled to 131 + 131
    assert {k: len(v) for k, v in written.items()} == {"train": 262, "val": 80, "test": 160}


def test_sms_spam_keeps_the_natural_mix(tmp_path, tiny_tokenizer):
    if not (SHARED_DATA / "sms_spam" / "SMSSpamCollection").is_file():
        pytest.skip("../shared/data is not beside this checkout")
    cfg = compose_cfg(tmp_path, ["stage=classify", "data=sms_spam"])
    dm = instantiate(cfg.data)
    connect_data(cfg, dm, tiny_tokenizer)
    dm.setup()
    # 4100 ham / 637 spam, each cut 70/10/20; all kept (balance=class_weights)
    assert {s: dm.class_counts(s) for s in ("train", "val", "test")} == {
        "train": [2870, 446],
        "val": [410, 64],
        "test": [820, 127],
    }
    assert dm.class_weights() == pytest.approx([3316 / (2 * 2870), 3316 / (2 * 446)])
    batch = next(iter(dm.test_dataloader()))
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}


@pytest.mark.slow
def test_the_threshold_chosen_on_val_is_tested_exported_and_used_by_predict(tmp_path):
    run = tmp_path / "run"
    cfg = train_classifier(
        run,
        [
            "max_steps=30",
            "batch_size=16",
            "seq_len=32",
            "bpe.vocab_size=300",
            "trainer.val_check_interval=10",
            "stage.module.trainable=all",
            "stage.module.positive=spam",
            "stage.module.max_fpr=0.05",
            "trainer.limit_val_batches=1.0",
        ],
    )
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    vals = [r for r in rows if r.get("val/threshold")]
    assert len(vals) == 3 and all(float(r["val/fpr/spam"]) <= 0.05 for r in vals)  # the rule, on val
    test = next(r for r in rows if r.get("test/acc"))
    saved = json.loads((run / "hf" / "config.json").read_text())["decision_threshold"]
    assert saved["label"] == "spam" and saved["max_fpr"] == 0.05
    assert any(float(r["val/threshold"]) == pytest.approx(saved["log_odds"]) for r in vals)
    # the exported threshold on plain transformers' logits reproduces the logged test numbers
    model = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    assert exported_threshold(model.config) == (1, pytest.approx(saved["log_odds"]))
    split = instantiate(cfg.data).splits()["test"]
    batch = tokenizer([text for *_, text, _ in split], truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = decide(model(**batch).logits, *exported_threshold(model.config))
    labels = torch.tensor([label for *_, label in split])
    ham = labels == 0
    assert float((predicted == labels).float().mean()) == pytest.approx(float(test["test/acc"]), abs=1e-6)
    assert float((predicted[ham] == 1).float().mean()) == pytest.approx(float(test["test/fpr/spam"]), abs=1e-6)
    # predict.py follows config.json's threshold: moved between two of six texts' spam log-odds, to where it labels
    # them otherwise than the argmax and the run's threshold do, it labels spam exactly the texts at or above it
    texts = [text for *_, text, _ in split[:6]]
    with torch.no_grad():
        logits = model(**tokenizer(texts, truncation=True, padding=True, return_tensors="pt")).logits
    odds = positive_log_odds(logits, 1).tolist()

    def labels_at(threshold: float) -> list[str]:
        return ["spam" if o >= threshold else "ham" for o in odds]

    argmax = [model.config.id2label[int(i)] for i in decide(logits, None, 0.0)]
    ranked = sorted(odds)
    cuts = [(hi - lo, (lo + hi) / 2) for lo, hi in zip(ranked[:-1], ranked[1:], strict=True)]
    gap, log_odds = max((gap, t) for gap, t in cuts if labels_at(t) not in (argmax, labels_at(saved["log_odds"])))
    assert gap > 1e-3, f"no clear gap between the texts' log-odds {ranked}"
    config = json.loads((run / "hf" / "config.json").read_text())
    config["decision_threshold"]["log_odds"] = log_odds
    (run / "hf" / "config.json").write_text(json.dumps(config))
    out = run_script("predict.py", f"run={run}", "input=-", input="\n".join(texts) + "\n").stdout.splitlines()
    assert [line.split("\t")[0] for line in out] == labels_at(log_odds)


def fit_and_test_a_tiny_classifier(cfg, tokenizer, callbacks: list, root) -> ClassifierModule:
    datamodule = instantiate(cfg.data)
    connect_data(cfg, datamodule, tokenizer)
    module = instantiate(
        cfg.stage.module,
        model=build_model(cfg.model, tokenizer, list(cfg.data.labels)),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        _recursive_=False,
        _convert_="all",
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        limit_test_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    return module


def test_the_module_writes_no_files_and_the_confusion_report_writes_them(tmp_path, tiny_tokenizer):
    run = tmp_path / "run"
    cfg = compose_cfg(run, ["stage=classify", "data.balance=none"])

    def written() -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "cache" not in p.parts)

    module = fit_and_test_a_tiny_classifier(cfg, tiny_tokenizer, [], tmp_path / "lightning")
    assert written() == []  # the module scores (and keeps the matrices), nothing more
    assert set(module.confusion) == {"val", "test"} and module.confusion["test"].shape == (2, 2)
    report = instantiate(cfg.callbacks.confusion)  # conf/callbacks/default.yaml: on under every stage
    assert isinstance(report, ConfusionReport) and report.out_dir == run
    module = fit_and_test_a_tiny_classifier(cfg, tiny_tokenizer, [report], tmp_path / "lightning")
    assert written() == ["confusion_test.csv", "confusion_test.png", "confusion_val.csv", "confusion_val.png"]
    for split in ("val", "test"):
        with open(run / f"confusion_{split}.csv") as f:
            table = list(csv.reader(f))
        assert table[0] == ["true \\ predicted", "ham", "spam"]
        assert [[int(x) for x in row[1:]] for row in table[1:]] == module.confusion[split].tolist()


def test_the_confusion_report_logs_to_wandb_and_skips_sanity_checks_and_other_modules(tmp_path, tiny_tokenizer):
    class Recorder(WandbLogger):
        def __init__(self):  # no wandb run: only what the report calls
            self.logged = []

        def log_table(self, key, columns, data):
            self.logged.append((key, columns, data))

        def log_image(self, key, images):
            self.logged.append((key, images))

    recorder, out = Recorder(), tmp_path / "out"
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=7, loggers=[recorder])
    report = ConfusionReport(str(out))
    report.on_validation_end(trainer, L.LightningModule())  # a language-model stage
    labels = ["ham", "spam"]
    module = ClassifierModule(tiny_classifier(tiny_tokenizer, labels=labels), {}, labels, "all", None, 0.02)
    report.on_test_end(trainer, module)  # nothing scored yet
    module.confusion["val"] = torch.tensor([[4, 0], [1, 1]])
    report.on_validation_end(SimpleNamespace(**{**vars(trainer), "sanity_checking": True}), module)
    assert not out.exists() and recorder.logged == []
    module.confusion["test"] = torch.tensor([[5, 1], [2, 3]])
    report.on_test_end(trainer, module)
    assert recorder.logged == [
        ("test/confusion_matrix", ["true", "ham", "spam"], [["ham", 5, 1], ["spam", 2, 3]]),
        ("test/confusion_matrix_png", [str(out / "confusion_test.png")]),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["confusion_test.csv", "confusion_test.png"]
