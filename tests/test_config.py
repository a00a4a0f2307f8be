"""Typed configs: schema defaults, YAML bases, CLI overrides, clear errors, save and reload."""
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from m2r.config import ConfigError, load_config, save_config
from m2r.models.config import ModelConfig


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: Inner = field(default_factory=Inner)


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_the_official_network():
    cfg = load_config(ModelConfig)
    assert cfg.dim == 48 and list(cfg.num_blocks) == [4, 6, 6, 8]
    assert cfg.moe.num_experts == 6 and cfg.moe.top_k == 2 and cfg.moe.combine == "log"
    assert cfg.mamba.scan == "raster" and cfg.input_range == "minus_one_one"
    assert list(cfg.clip.prompts) == ["hazy", "noisy", "raindrop", "rainy", "shadowed", "snowy"]


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path / "a.yaml", "train:\n  lr: 0.5\n  steps: 3\n")
    cfg = load_config(Outer, path, ["train.steps=7", "model.moe.ep_size=2"])
    assert cfg.train.lr == 0.5 and cfg.train.steps == 7 and cfg.model.moe.ep_size == 2


def test_bases_mount_under_a_section_and_are_overridden(tmp_path):
    write(tmp_path / "model.yaml", "dim: 8\nmoe:\n  num_experts: 4\n")
    path = write(tmp_path / "run.yaml", "_base_: [model.yaml@model]\nmodel:\n  dim: 16\n")
    cfg = load_config(Outer, path)
    assert cfg.model.dim == 16 and cfg.model.moe.num_experts == 4


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("train.steps=abc", "train.steps"),
    ("model.moe.top_k=1.5", "model.moe.top_k"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    assert "train.stepz" in str(err.value) and "bad.yaml" in str(err.value)


def test_a_section_given_a_scalar_names_the_section(tmp_path):
    """OmegaConf's own error names no key there."""
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'train':"):
        load_config(Outer, write(tmp_path / "bad.yaml", "train: 5\n"))
    with pytest.raises(ConfigError, match=r"key 'model.moe':"):
        load_config(Outer, write(tmp_path / "bad.yaml", "model:\n  moe: 3\n"))


def test_one_base_may_be_written_without_brackets(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  steps: 7\n")
    assert load_config(Outer, write(tmp_path / "run.yaml", "_base_: base.yaml\n")).train.steps == 7


def test_missing_file_and_malformed_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["train.steps"])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "_base_: []\n"])
def test_an_empty_config_file_is_refused_not_read_as_all_defaults(tmp_path, text):
    path = write(tmp_path / "cut.yaml", text)
    with pytest.raises(ConfigError, match="cut.yaml holds no keys"):
        load_config(Outer, path)


@pytest.mark.parametrize("text", ["_base_:\n", "_base_:\ntrain:\n  lr: 0.5\n"])
def test_a_base_key_naming_no_file_is_a_config_error_not_a_type_error(tmp_path, text):
    path = write(tmp_path / "mine.yaml", text)
    with pytest.raises(ConfigError, match="mine.yaml: _base_ names no file"):
        load_config(Outer, path)


def test_a_file_holding_only_its_base_is_the_base(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  lr: 0.5\n")
    assert load_config(Outer, write(tmp_path / "mine.yaml", "_base_: base.yaml\n")).train.lr == 0.5


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["train.lr=0.25", "model.clip.prompts=[a,b]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Outer, tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert not list(tmp_path.glob("run/*.tmp"))


def test_result_is_read_only():
    from omegaconf.errors import ReadonlyConfigError

    cfg = load_config(Outer)
    lr = cfg.train.lr
    with pytest.raises(ReadonlyConfigError):
        cfg.train.lr = 1.0
    assert cfg.train.lr == lr


def test_choice_fields_reject_other_values():
    with pytest.raises(ConfigError, match=r"moe\.combine.*'sum'.*\['log', 'linear'\]"):
        load_config(Outer, None, ["model.moe.combine=sum"])
    assert load_config(Outer, None, ["model.moe.combine=linear"]).model.moe.combine == "linear"


def test_a_stored_config_is_a_checked_base_layer():
    stored = {"train": {"lr": 0.5, "steps": 3}}
    cfg = load_config(Outer, None, ["train.steps=4"], base=stored)
    assert (cfg.train.lr, cfg.train.steps) == (0.5, 4)
    with pytest.raises(ConfigError, match=r"stored config.*train\.stepz"):
        load_config(Outer, None, base={"train": {"stepz": 1}})


def test_weights_are_refused_by_a_network_that_would_compute_something_else_with_them():
    from m2r.models.config import network_differences, require_same_network

    saved = {"input_range": "zero_one", "moe": {"ep_size": 2, "combine": "linear"}, "clip": {"weights": "/a.pt"}}
    run = load_config(ModelConfig, None, ["moe.combine=linear", "moe.ep_size=1", "clip.weights=/b.pt",
                                          "scan_backend=torch", "mamba.scan=bidirectional"])
    # ep_size, the CLIP file and the scan kernel say how the network runs; a key the saved config lacks
    # (mamba.scan: written before the key existed) counts at its default, the official raster scan.
    assert network_differences(saved, run) == [
        "model.input_range: checkpoint 'zero_one', this run 'minus_one_one'",
        "model.mamba.scan: checkpoint 'raster', this run 'bidirectional'"]
    assert network_differences(saved, run, allowed=["input_range", "mamba.scan"]) == []
    with pytest.raises(ConfigError, match=r"key 'run.resume': ckpt/step9 was saved from another network .*"
                                          r"model.input_range: checkpoint 'zero_one'.*Start over\."):
        require_same_network(saved, run, "run.resume", "ckpt/step9", "Start over.")


def test_later_bases_override_earlier_ones_and_the_file_overrides_its_bases(tmp_path):
    """A `*-plus` recipe builds on its paper recipe: later bases win over earlier ones, the file over its bases."""
    from m2r.engine.config import PretrainConfig

    (tmp_path / "a.yaml").write_text("train:\n  lr: 1.0\n  min_lr: 0.5\n  steps: 7\n")
    (tmp_path / "b.yaml").write_text("train:\n  lr: 2.0\n  min_lr: 0.25\n")
    (tmp_path / "top.yaml").write_text("_base_: [a.yaml, b.yaml]\ntrain:\n  min_lr: 0.125\n")
    cfg = load_config(PretrainConfig, tmp_path / "top.yaml")
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.steps) == (2.0, 0.125, 7)


@pytest.mark.parametrize("bases", [
    "m2r:model/tiny.yaml@model, m2r:model/m2restore-plus.yaml@model",
    "m2r:model/m2restore-plus.yaml@model, m2r:model/tiny.yaml@model",
])
def test_a_file_two_bases_start_from_is_merged_once_so_neither_base_is_undone(tmp_path, bases):
    """tiny.yaml and m2restore-plus.yaml both start from m2restore.yaml: a tiny network with the plus switches
    takes both as bases, in either order (m2restore.yaml merged again would undo tiny's sizes or the switches)."""
    cfg = load_config(Outer, write(tmp_path / "tiny-plus.yaml", f"_base_: [{bases}]\nmodel:\n  moe:\n"
                                                                  "    num_experts: 8\n"))
    model = cfg.model
    assert (model.dim, model.clip.kind, model.moe.num_experts) == (8, "tiny", 8)
    assert (model.input_range, model.moe.combine, model.mamba.scan) == ("zero_one", "linear", "bidirectional")


def test_a_base_a_list_names_again_after_an_entry_that_started_from_it_is_merged_again_there(tmp_path):
    """The demo's settings with the full network: m2restore.yaml comes after the demo (whose tiny.yaml starts from
    it), so it undoes tiny's sizes, as the list orders it; likewise a file listed twice on purpose."""
    from m2r.config import read_merged_yaml
    from m2r.engine.config import PretrainConfig

    cfg = load_config(PretrainConfig, write(tmp_path / "demo-full.yaml",
                                            "_base_: [m2r:pretrain/demo.yaml, m2r:model/m2restore.yaml@model]\n"))
    assert (cfg.model.dim, cfg.model.clip.kind, cfg.data.preset) == (48, "daclip", "five-task")
    write(tmp_path / "a.yaml", "train: {lr: 1.0}\n")
    write(tmp_path / "b.yaml", "train: {lr: 2.0}\n")
    assert read_merged_yaml(write(tmp_path / "aba.yaml", "_base_: [a.yaml, b.yaml, a.yaml]\n")).train.lr == 1.0


def test_a_file_mounted_at_two_sections_fills_both_and_nested_mounts_nest_in_order(tmp_path):
    from m2r.config import read_merged_yaml

    write(tmp_path / "inner.yaml", "value: 1\n")
    write(tmp_path / "common.yaml", "_base_: [inner.yaml@deep]\nown: 2\n")
    merged = read_merged_yaml(write(tmp_path / "top.yaml", "_base_: [common.yaml@x, common.yaml@y]\n"))
    assert OmegaConf.to_container(merged) == {"x": {"deep": {"value": 1}, "own": 2},
                                              "y": {"deep": {"value": 1}, "own": 2}}


def test_the_last_of_repeated_overrides_wins():
    """`key=a key=b` on the command line (e.g. a script's defaults followed by the user's) gives b."""
    from m2r.engine.config import PretrainConfig

    cfg = load_config(PretrainConfig, None, ["train.lr=0.1", "train.lr=0.2"])
    assert cfg.train.lr == 0.2


def test_a_saved_config_holds_values_not_interpolations(tmp_path, monkeypatch):
    """config.yaml beside a checkpoint is read on other machines (export, evaluate, resume): an
    `${oc.env:...}` or `${train.lr}` must be saved as the value it had in this run."""
    monkeypatch.setenv("M2R_TEST_LR", "0.25")
    path = tmp_path / "run.yaml"
    path.write_text("name: ${oc.env:M2R_TEST_LR}\ntrain:\n  lr: ${oc.env:M2R_TEST_LR}\n")
    cfg = load_config(Outer, path)
    save_config(cfg, tmp_path / "saved" / "config.yaml")
    assert "${" not in (tmp_path / "saved" / "config.yaml").read_text()
    monkeypatch.delenv("M2R_TEST_LR")
    again = load_config(Outer, tmp_path / "saved" / "config.yaml")
    assert again.train.lr == 0.25 and again.name == "0.25"


def test_flatten_names_every_level_of_a_nested_mapping():
    """The settings-change line of a resumed run names keys like model.moe.ep_size in full."""
    from m2r.config import flatten

    nested = {"model": {"moe": {"ep_size": 2, "top_k": 1}, "dim": 8}, "train": {"lr": 0.5}}
    assert flatten(nested) == {"model.moe.ep_size": 2, "model.moe.top_k": 1, "model.dim": 8, "train.lr": 0.5}


@pytest.mark.parametrize("override, key", [
    ("moe.top_k=9", "model.moe.top_k"),
    ("moe.ep_size=4", "model.moe.ep_size"),              # does not divide the 6 experts
    ("heads=[1,2,5,8]", "model.heads"),                   # 192 channels at level 3 into 5 heads
    ("heads=[1,2]", "model.heads"),
    ("num_blocks=[4,6,6]", "model.num_blocks"),
    ("aflb_heads=5", "model.aflb_heads"),
    ("dim=0", "model.dim"),
    ("moe.capacity_factor=-1", "model.moe.capacity_factor"),
    ("moe.dispatch=dense", "model.moe.dispatch"),         # with ep_size 2
    ("clip.prompts=[]", "model.clip.prompts"),
])
def test_model_keys_that_do_not_fit_together_are_named_before_a_network_is_built(override, key):
    """Checked with the config (every entry point, on one process), not by a rank building the network."""
    from m2r.models.config import check_model_settings

    overrides = [override, "moe.ep_size=2"] if override == "moe.dispatch=dense" else [override]
    cfg = load_config(ModelConfig, None, overrides)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        check_model_settings(cfg)


def test_every_shipped_network_fits_its_own_keys():
    from pathlib import Path

    from m2r.models.config import check_model_settings

    paths = sorted((Path(__file__).parents[1] / "configs/model").glob("*.yaml"))
    assert len(paths) >= 3, paths   # m2restore, m2restore-plus, tiny at least
    for path in paths:
        check_model_settings(load_config(ModelConfig, path))


def test_pretraining_and_finetuning_check_the_model_keys_with_their_config():
    from m2r.engine.config import FinetuneConfig, PretrainConfig, validate_finetune_config, validate_pretrain_config

    pretrain = load_config(PretrainConfig, None, ["model.moe.top_k=9", "data.shards=/data"])
    with pytest.raises(ConfigError, match="key 'model.moe.top_k'"):
        validate_pretrain_config(pretrain, world_size=1)
    finetune = load_config(FinetuneConfig, None, ["model.heads=[1,2,5,8]", "data.root=/data"])
    with pytest.raises(ConfigError, match="key 'model.heads'"):
        validate_finetune_config(finetune, world_size=1)


def test_the_code_reading_a_choice_knows_every_value_the_schema_allows():
    """A value added to a schema's choices but not to the code that reads it passes the config check
    and fails mid-run (or the other way round: a mode the code has, refused by the config)."""
    from m2r.engine.config import FINETUNE_DATASETS, PRECISIONS
    from m2r.eval.datasets import DATASETS
    from m2r.eval.loading import ACCELERATE_PRECISIONS

    assert DATASETS == FINETUNE_DATASETS
    assert tuple(ACCELERATE_PRECISIONS) == PRECISIONS


@pytest.mark.parametrize("override, key", [
    ("num_blocks=[4,-1,6,8]", "model.num_blocks"),          # a negative block count
    ("heads=[0,2,4,8]", "model.heads"),                      # else ZeroDivisionError in the width check
    ("aflb_heads=64", "model.aflb_heads"),                   # 96 channels (dim 48 x 2) into 64 heads
    ("aflb_heads=0", "model.aflb_heads"),                    # else ZeroDivisionError
    ("moe.top_k=0", "model.moe.top_k"),                      # no expert per token
    ("moe.ep_size=0", "model.moe.ep_size"),                  # else ZeroDivisionError
    ("moe.eval_capacity_factor=-1", "model.moe.eval_capacity_factor"),   #
    ("moe.num_experts=0", "model.moe.num_experts"),          # named by its own key, not top_k's
    # layer sizes: each crashed inside torch once every rank had started, or silently dropped a part
    ("mamba.d_conv=0", "model.mamba.d_conv"),               # else "negative padding is not supported"
    ("mamba.d_state=0", "model.mamba.d_state"),
    ("mamba.expand=0", "model.mamba.expand"),
    ("moe.expert_hidden_factor=0", "model.moe.expert_hidden_factor"),   # else ZeroDivisionError
    ("moe.expert_hidden_factor=0.01", "model.moe.expert_hidden_factor"),   # int(0.01 x 48) = 0 channels
    ("ffn_expansion_factor=0", "model.ffn_expansion_factor"),   # else "groups must be a positive integer"
    ("clip.image_size=0", "model.clip.image_size"),         # else a resize to 0x0 at the first batch
    ("prompt_dim=0", "model.prompt_dim"),                   # else trains with an empty task prompt
    ("prompt_atoms=0", "model.prompt_atoms"),
    ("cond_channels=1", "model.cond_channels"),             # its last layers are cond_channels // 2 wide
    ("num_refinement_blocks=-1", "model.num_refinement_blocks"),   # else silently none
])
def test_more_model_keys_that_do_not_fit_together_are_named(override, key):
    from m2r.models.config import check_model_settings

    with pytest.raises(ConfigError, match=f"key '{key}'"):
        check_model_settings(load_config(ModelConfig, None, [override]))


def test_the_smallest_layer_sizes_still_fit():
    """The bounds of the layer-size checks: what the tiny network uses must pass."""
    from m2r.models.config import check_model_settings

    check_model_settings(load_config(ModelConfig, None, ["dim=8", "num_refinement_blocks=0", "cond_channels=2",
                                                         "ffn_expansion_factor=0.125", "mamba.d_conv=1"]))


@pytest.mark.parametrize("override, key", [
    ("train.seed=-1", "train.seed"),                    # else numpy's generator refuses it at the first batch
    ("train.seed=4294967296", "train.seed"),            # x 1000 per rank: torch's manual_seed overflows
    ("data.seed_offset=-100", "data.seed_offset"),      # 42 - 100: a negative data seed
    ("run.stop_after_steps=-1", "run.stop_after_steps"),   # else stops at step 0 with exit status 0
    ("run.image_every=-1", "run.image_every"),          # else an image grid every step (step % -1 == 0)
    ("train.charbonnier_eps=0", "train.charbonnier_eps"),
    ("model.moe.balance_loss_weight=-0.01", "model.moe.balance_loss_weight"),   # rewards imbalance
])
def test_pretraining_refuses_values_that_fail_or_misbehave_after_start_up(override, key):
    from m2r.engine.config import PretrainConfig, validate_pretrain_config

    cfg = load_config(PretrainConfig, None, [override, "data.shards=/data"])
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        validate_pretrain_config(cfg, world_size=1)


@pytest.mark.parametrize("override, key", [
    ("train.seed=-1", "train.seed"),
    ("run.stop_after_epochs=-1", "run.stop_after_epochs"),   # else stops after the first epoch, status 0
    ("run.stop_after_steps=-1", "run.stop_after_steps"),
])
def test_finetuning_refuses_values_that_fail_or_misbehave_after_start_up(override, key):
    from m2r.engine.config import FinetuneConfig, validate_finetune_config

    cfg = load_config(FinetuneConfig, None, [override, "data.root=/data"])
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        validate_finetune_config(cfg, world_size=1)


def test_finetuning_refuses_a_list_file_for_cdd11_which_would_not_read_it():
    from m2r.engine.config import FinetuneConfig, validate_finetune_config

    cfg = load_config(FinetuneConfig, None, ["data.root=/data", "data.dataset=cdd11", "data.list_file=/data/x.txt"])
    with pytest.raises(ConfigError, match="key 'data.list_file'.*CDD-11 trains on every image"):
        validate_finetune_config(cfg, world_size=1)


@pytest.mark.parametrize("kind, required", [("pretrain", "data.shards=/data"), ("finetune", "data.root=/data")])
def test_a_compile_backend_set_without_compile_is_refused_naming_both_keys(kind, required):
    """train.compile_backend changes nothing in an eager run: set alone (to debug a compile), it would be ignored
    without a word. Its default alone, or with train.compile=true, passes."""
    from m2r.engine import config

    schema, validate = {"pretrain": (config.PretrainConfig, config.validate_pretrain_config),
                        "finetune": (config.FinetuneConfig, config.validate_finetune_config)}[kind]
    cfg = load_config(schema, None, [required, "train.compile_backend=aot_eager"])
    with pytest.raises(ConfigError, match="key 'train.compile_backend': value 'aot_eager' is used only by "
                                          r"train.compile=true \(here false\)"):
        validate(cfg, world_size=1)
    for passing in (["train.compile_backend=aot_eager", "train.compile=true"], ["train.compile=false"]):
        validate(load_config(schema, None, [required, *passing]), world_size=1)


def test_the_data_seed_is_judged_as_the_sum_it_is():
    """data.seed_offset is added to train.seed: judged alone, a negative offset would be refused for nothing and an
    offset pushing the sum past 2**32 let through."""
    from m2r.engine.config import PretrainConfig, validate_pretrain_config

    validate_pretrain_config(load_config(PretrainConfig, None, ["data.shards=/data", "train.seed=100",
                                                                "data.seed_offset=-50"]), world_size=1)
    cfg = load_config(PretrainConfig, None, ["data.shards=/data", "train.seed=4294967290", "data.seed_offset=10"])
    with pytest.raises(ConfigError, match="key 'data.seed_offset'.*gives the seed 4294967300"):
        validate_pretrain_config(cfg, world_size=1)


def test_the_shipped_seeds_and_limits_still_pass():
    from m2r.engine.config import PretrainConfig, validate_pretrain_config

    validate_pretrain_config(load_config(PretrainConfig, None, ["data.shards=/data", "train.seed=0",
                                                                "data.seed_offset=7", "run.image_every=0",
                                                                "model.moe.balance_loss_weight=0"]), world_size=1)


@pytest.mark.parametrize("override", ["data.weights=[1]", "data.weights.rain=[1]"])
def test_a_list_where_the_mixture_weights_go_is_a_config_error(override):
    """Not a TypeError traceback (exit status 1) from OmegaConf's merge or from float()."""
    from m2r.data.config import check_data_settings
    from m2r.engine.config import PretrainConfig

    with pytest.raises(ConfigError, match="data.weights"):
        check_data_settings(load_config(PretrainConfig, None, [override]).data)


def test_a_saved_finetuning_config_names_every_path_absolute_and_leaves_unset_ones_as_given(tmp_path, monkeypatch):
    """`with_absolute_paths` (config.yaml of a run and its checkpoints): finetuning's data.root, data.list_file,
    data.val_root, init.weights and run.dir, relative as given, name the same files from any directory; an empty
    init.weights (scratch) stays empty, not this directory; interpolations are resolved, a path's before it is made
    absolute, any other key's too (a resume compares the values with those saved)."""
    from m2r.engine.config import FinetuneConfig, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(FinetuneConfig, None, ["data.root=data/allweather", "data.list_file=lists/train.txt",
                                             "data.val_root=${data.root}/test", "run.dir=runs/ft",
                                             "init.weights=../pre/checkpoints", "train.min_lr=${train.lr}"])
    saved = with_absolute_paths(cfg)
    assert (saved.data.root, saved.data.list_file, saved.data.val_root, saved.run.dir, saved.init.weights) == (
        str(tmp_path / "data/allweather"), str(tmp_path / "lists/train.txt"), str(tmp_path / "data/allweather/test"),
        str(tmp_path / "runs/ft"), str(tmp_path.parent / "pre/checkpoints"))
    assert OmegaConf.to_container(saved)["train"]["min_lr"] == cfg.train.lr
    assert with_absolute_paths(load_config(FinetuneConfig, None, ["init.weights=''"])).init.weights == ""


def test_a_saved_shard_pattern_names_the_same_shards_from_any_directory(tmp_path, monkeypatch):
    """data.shards and data.val_shards may be brace patterns (m2r/data/shard_list.py): a relative one is prefixed
    with the run's directory, one whose alternatives are absolute stays as given (a prefix would move them under
    it), and a `..` after a brace is kept, not folded into one path."""
    from m2r.data.shard_list import expand_braces
    from m2r.engine.config import PretrainConfig, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    for given, shards in (("shards/train-{000..001}.tar", [tmp_path / "shards/train-000.tar",
                                                            tmp_path / "shards/train-001.tar"]),
                          ('"{/disk1/a.tar,/disk2/b.tar}"', ["/disk1/a.tar", "/disk2/b.tar"]),
                          ("shards/{a,b}/../c.tar", [tmp_path / "shards/a/../c.tar", tmp_path / "shards/b/../c.tar"])):
        for key in ("data.shards", "data.val_shards"):
            saved = with_absolute_paths(load_config(PretrainConfig, None, [f"{key}={given}"]))
            assert expand_braces(OmegaConf.select(saved, key)) == [str(path) for path in shards], (key, given)
