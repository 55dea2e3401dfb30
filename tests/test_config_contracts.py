"""Config contracts: a data preset holds data fields alone, a trainer preset trainer settings alone.

The run's facts (model.arch, seq_len, batch_size, seed, the loader settings, the chat template) reach a datamodule
through ``connect`` (train.connect_data), so a data preset must resolve with nothing but ``paths`` beside it: no
model, seq_len, batch_size, seed or template at the root. Each inherits the schema preset of its shape
(conf/data/schema/), which lists every field of its datamodule.
"""

from __future__ import annotations

import inspect

import pytest
from conftest import REPO, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lmlab.core.models import compile_mode, cuda_graphs
from lmlab.core.runs import register_resolvers
from train import chat_template, fit_and_export, loader_settings

register_resolvers()
DATA = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))
SCHEMAS = sorted(p.stem for p in (REPO / "conf" / "data" / "schema").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))
NO_EFFECT = {"datamodules.preference.PreferenceDataModule": {"train_on_prompt"}}  # SFT's constructor: pairs ignore it


def alone(*overrides: str):
    """What the given presets write, composed with no primary config."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(overrides=list(overrides))


def fields(target: str) -> set[str]:
    """The constructor parameters of a datamodule class: the fields a data preset may set."""
    return set(inspect.signature(get_class(target).__init__).parameters) - {"self"}


@pytest.mark.parametrize("preset", DATA)
def test_a_data_preset_resolves_with_only_paths_beside_it(preset):
    cfg = alone(f"+data={preset}", "+paths=default")
    assert set(cfg) == {"data", "paths"}
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    assert set(data) - {"_target_", "_convert_"} <= fields(data["_target_"])


@pytest.mark.parametrize("schema", SCHEMAS)
def test_a_schema_preset_lists_every_field_of_its_datamodule(schema):
    data = OmegaConf.to_container(alone(f"+data=schema/{schema}", "+paths=default").data, resolve=True)
    assert set(data) - {"_target_", "_convert_"} == fields(data["_target_"]) - NO_EFFECT.get(data["_target_"], set())


def test_every_data_preset_inherits_a_schema_or_another_preset():
    for preset in DATA:
        defaults = OmegaConf.load(REPO / "conf" / "data" / f"{preset}.yaml").get("defaults", [])
        inherited = [d for d in defaults if d != "_self_"]
        assert len(inherited) == 1, f"{preset}: {defaults}"
        name = inherited[0].removesuffix("@_here_")
        assert name in DATA or (name.startswith("schema/") and inherited[0].endswith("@_here_")), preset
        assert not name.startswith("sample_"), f"{preset} inherits {name}: a bundled sample set, not its schema"


@pytest.mark.parametrize("preset", TRAINERS)
def test_a_trainer_preset_writes_only_trainer(preset):
    assert set(alone(f"+trainer={preset}")) == {"trainer"}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer=cpu"], {"num_workers": 0, "pad_to_multiple_of": 1, "pin_memory": False}),
        (["trainer=gpu"], {"num_workers": 4, "pad_to_multiple_of": 64, "pin_memory": True}),
        # packed rows under CUDA graphs: a graph per width, so fewer widths
        (
            ["trainer=gpu", "packing=true", "compile=reduce-overhead"],
            {"num_workers": 4, "pad_to_multiple_of": 256, "pin_memory": True},
        ),
        (["trainer=gpu", "compile=reduce-overhead"], {"num_workers": 4, "pad_to_multiple_of": 64, "pin_memory": True}),
        (
            ["trainer=gpu", "packing=true", "compile=true"],
            {"num_workers": 4, "pad_to_multiple_of": 64, "pin_memory": True},
        ),
        (
            ["trainer=gpu", "num_workers=2", "pad_to_multiple_of=8", "pin_memory=false"],
            {"num_workers": 2, "pad_to_multiple_of": 8, "pin_memory": False},
        ),
    ],
)
def test_loader_settings_follow_the_accelerator_under_auto(tmp_path, overrides, expected):
    assert loader_settings(compose_cfg(tmp_path, overrides)) == expected


@pytest.mark.parametrize("setting", ["pin_memory='false'", "num_workers=2.5"])
def test_a_loader_setting_of_another_type_is_an_error(tmp_path, setting):
    """A quoted 'false' was cast with bool(), which made it True."""
    key = setting.split("=")[0]
    with pytest.raises(ValueError, match=f"{key}=.*: give auto or a (bool|int)"):
        loader_settings(compose_cfg(tmp_path, [setting]))


def test_compile_takes_a_torch_compile_mode_and_names_the_choices_otherwise():
    assert [compile_mode(c) for c in (False, True, "reduce-overhead")] == [None, "default", "reduce-overhead"]
    assert cuda_graphs("reduce-overhead") and cuda_graphs("max-autotune") and not cuda_graphs(True)
    with pytest.raises(ValueError, match=r"compile='fast': false, true or a torch.compile mode \(default, reduce-"):
        compile_mode("fast")


def test_a_run_refuses_an_unknown_compile_mode_and_cuda_graphs_with_gradient_accumulation(tmp_path):
    """Both before anything is built. Under CUDA graphs a replayed backward hands .grad the graph's own output, which
    the next micro-batch takes back: torch would stop at the second backward."""
    with pytest.raises(ValueError, match="compile='fast'"):
        fit_and_export(compose_cfg(tmp_path, ["compile=fast"]))
    accumulating = ["compile=reduce-overhead", "trainer.accumulate_grad_batches=2"]
    with pytest.raises(ValueError, match=r"compile=reduce-overhead \(CUDA graphs\) does not accumulate .*\(got 2\)"):
        fit_and_export(compose_cfg(tmp_path, accumulating))


@pytest.mark.parametrize("stage", ["sft", "dpo", "pretrain", "classify"])
def test_the_run_chat_template_keeps_its_order(tmp_path, tiny_tokenizer, stage):
    """Chat data (SFT, preference): the preset's own, else template=, else the tokenizer's. Other data: the
    tokenizer's, else template= (what the data presets' ${template.chat_template} gave before connect took it)."""
    cfg = compose_cfg(tmp_path, [f"stage={stage}", "template=alpaca"])
    preset, dm = cfg.template.chat_template, instantiate(cfg.data)
    tiny_tokenizer.chat_template = "the tokenizer's"
    if stage in ("sft", "dpo"):
        assert chat_template(cfg, dm, tiny_tokenizer) == preset
        dm.own_chat_template = "the data's own"
        assert chat_template(cfg, dm, tiny_tokenizer) == "the data's own"
        dm.own_chat_template, cfg.template.chat_template = None, None  # template=tokenizer
        assert chat_template(cfg, dm, tiny_tokenizer) == "the tokenizer's"
    else:
        assert chat_template(cfg, dm, tiny_tokenizer) == "the tokenizer's"
        tiny_tokenizer.chat_template = None
        assert chat_template(cfg, dm, tiny_tokenizer) == preset


@pytest.mark.parametrize("schema", SCHEMAS)
def test_a_schema_default_is_its_datamodules_default(schema):
    """conf/ and code agree: where a constructor has a default, the schema declares that same value. Exempt: a field
    set through ``${paths...}`` (the infrastructure's) and a code default of None (nothing given: e.g. the text
    schema's span_corruption settings, without which a seq2seq run stops with a clear error)."""
    data = OmegaConf.to_container(alone(f"+data=schema/{schema}", "+paths=default").data)
    params = inspect.signature(get_class(data["_target_"]).__init__).parameters
    differ = {
        name: (value, params[name].default)
        for name, value in data.items()
        if name in params
        and params[name].default not in (inspect.Parameter.empty, None)
        and not (isinstance(value, str) and "${" in value)
        and value != params[name].default
    }
    assert not differ, f"schema/{schema} (conf value, code default): {differ}"
