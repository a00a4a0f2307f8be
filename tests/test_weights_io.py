"""The shared weight-file reader: formats by suffix, weights_only pickles, wrapper prefixes."""
import pickle
from argparse import Namespace

import pytest
import safetensors.torch
import torch

from m2r.models.weights_io import load_weights_file, unwrap_state_dict


def test_safetensors_and_torch_pickles_read_back_on_the_cpu(tmp_path):
    state = {"conv.weight": torch.arange(6.0).reshape(2, 3)}
    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.ckpt")
    assert torch.equal(load_weights_file(tmp_path / "w.safetensors")["conv.weight"], state["conv.weight"])
    assert load_weights_file(tmp_path / "w.ckpt")["epoch"] == 3


def test_weights_only_refuses_pickled_objects_unless_told_otherwise(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"hyper_parameters": Namespace(lr=0.1)}, path)  # an object, as training checkpoints may hold
    with pytest.raises(pickle.UnpicklingError):
        load_weights_file(path)
    assert load_weights_file(path, weights_only=False)["hyper_parameters"].lr == 0.1


def test_the_wrapper_prefix_goes_only_when_every_key_carries_it():
    weight = torch.zeros(1)
    assert unwrap_state_dict({"state_dict": {"module.a": weight, "module.b": weight}}, "module.") == \
        {"a": weight, "b": weight}
    mixed = {"module.a": weight, "b": weight}
    assert unwrap_state_dict(mixed, "module.") is mixed
    assert unwrap_state_dict({}, "net.") == {}
