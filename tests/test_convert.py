"""Official checkpoint conversion, against the official key layout in tests/official_keys.json
(written by tests/make_official_keys.py from the official module definitions)."""
import json
import re
import os

import pytest
import torch

from m2r.config import load_config
from m2r.models.config import ModelConfig
from m2r.models.convert import (CheckpointMismatch, load_official_checkpoint, m2r_to_official,
                                official_to_m2r)
from m2r.models.m2restore import build_model

OFFICIAL_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_keys.json")
ROUTER_BUFFERS = {f"mcdb{level}.model.{name}" for level in (1, 2, 3) for name in ("mean", "std")}
DACLIP_KEYS = ["daclip.logit_scale", "daclip.clip.visual.conv1.weight",
               "daclip.visual_control.transformer.zero_modules.0.weight"]


def model_config(name, *overrides):
    return load_config(ModelConfig, f"configs/model/{name}.yaml", list(overrides))


@pytest.fixture(scope="module")
def official_shapes():
    with open(OFFICIAL_KEYS) as f:
        return {key: tuple(shape) for key, shape in json.load(f).items()}


@pytest.fixture(scope="module")
def official_meta_state(official_shapes):
    """The official faithful state dict, as meta tensors (shapes without memory)."""
    return {key: torch.empty(shape, device="meta") for key, shape in official_shapes.items()}


@pytest.fixture(scope="module")
def faithful_shapes():
    with torch.device("meta"):
        model = build_model(model_config("m2restore"), with_clip_prior=False)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_official_checkpoint():
    """A Lightning-style official checkpoint of the tiny network, with DA-CLIP keys beside it."""
    source = build_model(model_config("tiny", "seed=3"), with_clip_prior=False)
    official = m2r_to_official(source.state_dict())
    state = {f"net.{key}": value for key, value in official.items()}
    state.update({f"net.{key}": torch.zeros(2) for key in DACLIP_KEYS})
    return source.state_dict(), {"state_dict": state, "epoch": 7}


def test_official_layout_holds_the_official_parameter_count(official_shapes):
    params = sum(torch.Size(shape).numel() for key, shape in official_shapes.items()
                 if key not in ROUTER_BUFFERS)
    assert params == 46_830_041


def test_official_layout_converts_to_exactly_our_keys_and_shapes(official_meta_state, faithful_shapes):
    converted = official_to_m2r(official_meta_state)
    assert {key: tuple(value.shape) for key, value in converted.items()} == faithful_shapes


def test_official_to_ours_to_official_is_the_identity(official_meta_state):
    round_trip = m2r_to_official(official_to_m2r(official_meta_state))
    assert round_trip.keys() == official_meta_state.keys()
    reshaped = {f"mcdb{level}.model.gate_boost" for level in (1, 2, 3)}  # 0-dim <-> (1,)
    assert all(round_trip[key] is value for key, value in official_meta_state.items()
               if key not in ROUTER_BUFFERS | reshaped)
    assert all(round_trip[key].shape == () for key in reshaped)
    assert all(round_trip[key].item() == (0.0 if key.endswith("mean") else 1.0) for key in ROUTER_BUFFERS)


def test_lightning_prefix_and_daclip_keys_are_handled(official_meta_state):
    lightning = {"state_dict": {f"net.{key}": value for key, value in official_meta_state.items()}}
    lightning["state_dict"].update({f"net.{key}": torch.zeros(1) for key in DACLIP_KEYS})
    converted = official_to_m2r(lightning)
    assert converted.keys() == official_to_m2r(official_meta_state).keys()
    assert not any("clip" in key for key in converted)


def test_expert_parallel_rank_keeps_its_global_experts(official_meta_state):
    converted = official_to_m2r(official_meta_state, ep_size=2, ep_rank=1)
    expert_keys = [key for key in converted if key.startswith("dder2.deepspeed_moe.")]
    assert len(expert_keys) == 3 * 4  # experts 3, 4, 5 as local 0, 1, 2; fc1/fc2 weight/bias
    assert converted["dder2.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"] is \
        official_meta_state["mcdb2.model.el.3.fc1.weight"]
    assert "dder2.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight" not in converted


def test_load_official_checkpoint_reproduces_the_weights(tmp_path, tiny_official_checkpoint):
    source_state, checkpoint = tiny_official_checkpoint
    path = tmp_path / "official.ckpt"
    torch.save(checkpoint, path)
    target = build_model(model_config("tiny", "seed=4"), with_clip_prior=False)
    dropped = load_official_checkpoint(target, path)
    assert set(dropped) == set(DACLIP_KEYS) | ROUTER_BUFFERS
    loaded = target.state_dict()
    assert loaded.keys() == source_state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in source_state.items())


def test_a_missing_or_misshapen_key_is_named(tmp_path, tiny_official_checkpoint):
    _, checkpoint = tiny_official_checkpoint
    state = dict(checkpoint["state_dict"])
    del state["net.fre2.para1"]
    state["net.output.weight"] = torch.zeros(3, 1, 3, 3)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    target = build_model(model_config("tiny"), with_clip_prior=False)
    expected = r"missing \(1\): aflb2\.para1.*wrong shape \(1\): output\.weight"
    with pytest.raises(CheckpointMismatch, match=expected):
        load_official_checkpoint(target, path)


def test_weights_whose_only_fault_is_a_wrong_shape_are_named_as_a_mismatch():
    """Also when no key is missing or unexpected: a one-line CheckpointMismatch (exit 2 from the CLIs),
    not torch's load_state_dict RuntimeError."""
    from m2r.models.convert import CheckpointMismatch, check_fits

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 3, 1))
    state = dict(model.state_dict())
    state["1.weight"] = torch.zeros(3, 2, 1, 1)
    with pytest.raises(CheckpointMismatch, match=re.escape("w.safetensors does not fit the model; wrong shape (1): "
                                                           "1.weight: (3, 2, 1, 1) vs model (3, 4, 1, 1)")):
        check_fits(model, state, source="w.safetensors")
    check_fits(model, model.state_dict(), source="w.safetensors")   # a fitting state passes
    wide = {f"extra.{i}": torch.zeros(1) for i in range(10)}
    with pytest.raises(CheckpointMismatch, match=re.escape("unexpected (10): extra.0, extra.1, extra.2, extra.3, "
                                                           "extra.4, extra.5, and 4 more")):
        check_fits(model, {**model.state_dict(), **wide}, source="w.safetensors")
