"""The learning-rate schedule, AdamW's parameter groups and the EMA weights (m2r/engine/optim.py)."""
from pathlib import Path

import pytest
import torch

from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.optim import EMA, LRSchedule, build_optimizer, learning_rate, set_learning_rate


TINY = "configs/pretrain/tiny-test.yaml"


def tiny_config(repo_root, *overrides):
    return load_config(PretrainConfig, Path(repo_root) / TINY, list(overrides))


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    schedule = LRSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=4, steps=104)
    assert [learning_rate(s, schedule) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert learning_rate(54, schedule) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(103, schedule) == pytest.approx(1e-5, abs=1e-6)
    lrs = [learning_rate(s, schedule) for s in range(4, 104)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_moves_a_decay_share_toward_the_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    restored = EMA(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_ema_parts_split_the_dense_weights_from_this_ranks_experts(repo_root):
    """Rank 0 saves the dense part, the first replica of each expert shard its experts (TrainingRun._ema_state)."""
    from m2r.engine.experts import EXPERT_INFIX
    from m2r.models.m2restore import build_model

    ema = EMA(build_model(tiny_config(repo_root).model), decay=0.9)
    experts, dense = ema.state_dict(dense=False), ema.state_dict(experts=False)
    assert experts and all(EXPERT_INFIX in name for name in experts)
    assert dense and not any(EXPERT_INFIX in name for name in dense)
    assert {**experts, **dense}.keys() == ema.state_dict().keys()


def test_past_its_schedule_the_cosine_goes_on_as_the_official_closed_form_does():
    """The official AllWeather recipe: warmup 15 epochs, cosine to 0 at epoch 180, 200 epochs; its last 20
    epochs run at a learning rate rising to about 6e-6 (spec section 2), not at 0 (steps that change nothing)."""
    per_epoch = 1129
    schedule = LRSchedule(lr=2e-4, min_lr=0.0, warmup_steps=15 * per_epoch, steps=180 * per_epoch)
    assert learning_rate(180 * per_epoch, schedule) == pytest.approx(0.0, abs=1e-12)
    past = [learning_rate(epoch * per_epoch, schedule) for epoch in range(181, 200)]
    assert all(a < b for a, b in zip(past, past[1:])) and 0 < past[0] and past[-1] == pytest.approx(6.47e-6, rel=1e-3)
    # 1e-4 * (1 + cos(pi * (199 - 15) / (180 - 15))) = 6.47e-6 at the start of the last epoch


def test_ema_weights_are_applied_for_the_duration_and_the_trained_ones_come_back_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).bfloat16()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.37)          # training moved the weights; the EMA is halfway
    ema.update()
    trained = [p.clone() for p in model.parameters()]
    with ema.applied():
        for param, shadow, trained_param in zip(model.parameters(), ema.shadow.values(), trained):
            assert torch.equal(param, shadow.to(param.dtype)) and not torch.equal(param, trained_param)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_the_first_step_after_warmup_runs_at_the_peak_learning_rate_and_none_exceeds_it():
    schedule = LRSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=4, steps=104)
    assert learning_rate(4, schedule) == pytest.approx(1e-3)
    assert max(learning_rate(step, schedule) for step in range(120)) == pytest.approx(1e-3)


def test_every_parameter_group_experts_included_gets_this_runs_adamw_settings_and_learning_rate(repo_root):
    """Expert parameters sit in their own groups (DeepSpeed's MoE reduction): the schedule and the
    AdamW settings must reach them as they reach the dense ones."""
    from m2r.models.m2restore import build_model

    cfg = load_config(PretrainConfig, Path(repo_root) / "configs/pretrain/tiny-test.yaml",
                      ["train.betas=[0.8,0.95]", "train.eps=1e-7", "train.weight_decay=0.03"])
    optimizer = build_optimizer(build_model(cfg.model), cfg.train)
    assert any(group.get("moe") for group in optimizer.param_groups)
    assert any(not group.get("moe") for group in optimizer.param_groups)
    for group in optimizer.param_groups:
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-7, 0.03)
    set_learning_rate(optimizer, 0.0123)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0123] * len(optimizer.param_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ema_update_is_each_weights_own_lerp_in_fp32(dtype):
    """One multi-tensor update, bit for bit what lerping weight by weight gives (bf16 weights averaged in fp32)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3)).to(dtype)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    expected = {name: shadow.clone().lerp_(dict(model.named_parameters())[name].float(), 0.1)
                for name, shadow in ema.shadow.items()}
    ema.update()
    assert all(torch.equal(ema.shadow[name], expected[name]) for name in expected)


def _linked_to_master(param, master, start):
    """`param` as DeepSpeed's ZeRO 1/2 optimizer leaves it: its fp32 master fragment (`master`, the values
    of the flattened parameter from `start`) held in this rank's partition, None when it holds none."""
    from types import SimpleNamespace

    param._dp_group = None
    param._hp_mapping = None if master is None else SimpleNamespace(
        hp_fragment=master, lp_fragment_address=SimpleNamespace(start=start, numel=master.numel()))
    return param


def test_under_zero_the_ema_follows_the_fp32_master_fragments_not_the_bf16_module_weights():
    """A bf16 run's module holds rounded copies; the optimizer updates fp32 masters, partitioned over the
    ranks. Each rank averages its fragments; in full, the other ranks' parts come as zeros to be summed."""
    model = torch.nn.Linear(3, 2, bias=True).bfloat16()
    weight_master = torch.tensor([0.1234567, -2.0000305, 7.654321])   # not bf16 numbers
    _linked_to_master(model.weight, weight_master, start=2)                # this rank: values 2..4 of 6
    _linked_to_master(model.bias, None, start=0)                           # another rank's partition
    ema = EMA(model, decay=0.75)
    assert ema.shadow["weight"].tolist() == weight_master.tolist() and ema.shadow["bias"].numel() == 0

    expected = weight_master.lerp(weight_master + 4.0, 0.25)
    weight_master += 4.0      # an optimizer step moves the masters; the bf16 copies round them
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update()
    assert torch.equal(ema.shadow["weight"], expected)
    full = ema.state_dict()
    assert full["weight"].flatten().tolist() == [0.0, 0.0, *expected.tolist(), 0.0]
    assert full["bias"].tolist() == [0.0, 0.0]

    restored = EMA(model, decay=0.75)
    restored.load_state_dict({"weight": torch.arange(6.0).view(2, 3), "bias": torch.ones(2)})
    assert restored.shadow["weight"].tolist() == [2.0, 3.0, 4.0] and restored.shadow["bias"].numel() == 0


def test_the_ema_names_what_it_follows():
    """ZeRO 1/2 links the weights to fp32 master fragments (even where this rank holds none of one)."""
    assert EMA(torch.nn.Linear(3, 2), decay=0.5).follows().startswith("the module weights")
    model = torch.nn.Linear(3, 2).bfloat16()
    _linked_to_master(model.weight, torch.zeros(6), start=0)
    _linked_to_master(model.bias, None, start=0)
    assert EMA(model, decay=0.5).follows().startswith("the fp32 master fragments ZeRO partitions")


def test_pretrainings_schedule_counts_the_train_sections_steps(repo_root):
    cfg = load_config(PretrainConfig, Path(repo_root) / "configs/pretrain/tiny-test.yaml",
                      ["train.lr=1e-3", "train.min_lr=1e-5", "train.warmup_steps=4", "train.steps=104"])
    assert LRSchedule.of_steps(cfg.train) == LRSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=4, steps=104)


def test_the_start_up_line_names_the_step_after_which_the_cosine_is_at_its_floor():
    """Counted from 1, as the console counts steps: the run's 104 steps end just above min_lr, the 105th
    would run at it; a run past the schedule says where the cosine rises to."""
    schedule = LRSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=4, steps=104)
    assert learning_rate(104, schedule) == pytest.approx(1e-5) and learning_rate(103, schedule) > 1e-5
    assert schedule.describe(104) == schedule.describe(105) == "warmup 4, cosine to min_lr after step 104"
    rising = f", then rising again to {learning_rate(105, schedule):.2e} at the last step"
    assert schedule.describe(106).endswith(rising)
