"""A resume at another topology (m2r/engine/zero_state.py, TrainingRun._carry_optimizer): ZeRO shards stitched
per parameter and cut into new partitions, the fp16 loss scale, and the warning that says what was kept."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from m2r import dist
from m2r.engine.checkpoint import CheckpointRef, Topology


def test_zero_fragments_are_stitched_in_rank_order_and_experts_renamed_per_ep_rank(tmp_path):
    """The fp32 master weights of a ZeRO run come from every rank's fragments, joined in rank order (another
    order would export a silently permuted weight), experts renamed by their expert-parallel rank."""
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.export import fp32_master_weights

    tag = tmp_path / "step00000001"
    tag.mkdir()
    expert = "dder1.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"
    # world 4, ep_size 2: ranks 0 and 2 hold ep_rank 0 (expert 0), ranks 1 and 3 ep_rank 1 (expert 1);
    # the dense weight is split over all 4 ranks, the expert over its data-parallel pair.
    for rank in range(4):
        flat = torch.arange(4.0) + 10 * rank
        mapping = {"dense.weight": SimpleNamespace(start=0, numel=2), expert: SimpleNamespace(start=2, numel=2)}
        torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [flat],
                                             "param_slice_mappings": [mapping]}},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    weights = fp32_master_weights(CheckpointRef(tmp_path, tag.name), ep_size=2, num_experts=2)
    assert weights["dense.weight"].tolist() == [0, 1, 10, 11, 20, 21, 30, 31]
    assert weights[expert].tolist() == [2, 3, 22, 23]
    assert weights[expert.replace(".0.", ".1.")].tolist() == [12, 13, 32, 33]


def _partition_holding(tail_of_a: int, head_of_b: int):
    """A fake ZeRO optimizer whose one flat partition holds the last `tail_of_a` values of a 4-value
    parameter `a` and the first `head_of_b` of a 3-value `b`, then 1 value of padding."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    a._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=4 - tail_of_a, numel=tail_of_a),
                                    hp_fragment_address=SimpleNamespace(start=0, numel=tail_of_a))
    b._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0, numel=head_of_b),
                                    hp_fragment_address=SimpleNamespace(start=tail_of_a, numel=head_of_b))
    flat = torch.full((tail_of_a + head_of_b + 1,), -1.0)
    zero = SimpleNamespace(bit16_groups=[[a, b]], single_partition_of_fp32_groups=[flat],
                           optimizer=SimpleNamespace(state={}))
    return zero, flat, {id(a): "a", id(b): "b"}


def test_a_new_zero_partition_takes_each_parameters_fragment_of_the_saved_state():
    """A resume at another topology: the masters and both AdamW moments of exactly the fragments this
    rank's partition holds, at their offsets, and the saved step count (AdamW's bias correction)."""
    from m2r.engine.zero_state import _fill_partition

    zero, flat, names = _partition_holding(tail_of_a=1, head_of_b=2)
    saved = {name: {"fp32": torch.arange(n) + base, "exp_avg": torch.arange(n) + base + 100,
                    "exp_avg_sq": torch.arange(n) + base + 200, "step": torch.tensor(7.0)}
             for name, n, base in (("a", 4, 0.0), ("b", 3, 10.0))}
    assert _fill_partition(zero, 0, flat, saved, names) is True
    assert flat.tolist() == [3, 10, 11, -1]   # padding left alone
    state = zero.optimizer.state[flat]
    assert state["exp_avg"].tolist() == [103, 110, 111, 0] and state["exp_avg_sq"].tolist() == [203, 210, 211, 0]
    assert float(state["step"]) == 7.0


def test_a_partition_saved_before_any_step_leaves_adamw_fresh_and_disagreeing_steps_are_refused():
    from m2r.engine.zero_state import _fill_partition

    zero, flat, names = _partition_holding(tail_of_a=2, head_of_b=1)
    masters_only = {"a": {"fp32": torch.arange(4.0)}, "b": {"fp32": torch.arange(3.0)}}
    assert _fill_partition(zero, 0, flat, masters_only, names) is False
    assert flat.tolist() == [2, 3, 0, -1] and zero.optimizer.state == {}

    disagreeing = {name: {"fp32": torch.zeros(n), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n),
                          "step": torch.tensor(step)} for name, n, step in (("a", 4, 7.0), ("b", 3, 6.0))}
    with pytest.raises(ValueError, match="parameter group 0: the saved step counts disagree"):
        _fill_partition(zero, 0, flat, disagreeing, names)


def test_a_rank_that_fails_to_re_partition_makes_every_rank_raise(monkeypatch):
    """Otherwise the others would wait for it in their next collective until the timeout."""
    from m2r.engine import zero_state

    def fails(engine, ref):
        raise OSError("shard-3 unreadable")
    monkeypatch.setattr(zero_state, "_load_resharded", fails)
    with pytest.raises(OSError, match="shard-3 unreadable"):
        zero_state.load_resharded_optimizer_state(None, None)
    monkeypatch.setattr(zero_state, "_load_resharded", lambda engine, ref: (True, False))
    monkeypatch.setattr(dist, "max_over_ranks", lambda value: max(value, zero_state._FAILED))  # another rank failed
    with pytest.raises(RuntimeError, match="another rank could not re-partition the optimizer state"):
        zero_state.load_resharded_optimizer_state(None, None)


def test_every_resume_takes_this_runs_eps_and_weight_decay_too():
    from m2r.engine.optim import apply_optimizer_settings

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    apply_optimizer_settings(opt, SimpleNamespace(betas=[0.5, 0.9], eps=1e-6, weight_decay=0.0))
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.5, 0.9), 1e-6, 0.0)


def test_moments_and_steps_are_stitched_from_their_own_parameter_group(tmp_path):
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.engine.zero_state import stitched_zero_state

    tag = tmp_path / "step00000001"
    tag.mkdir()
    for rank in range(2):
        groups = [torch.arange(2.0) + 10 * rank, torch.arange(2.0) + 100 + 10 * rank]
        state = {g: {"exp_avg": groups[g] + 1000, "exp_avg_sq": groups[g] + 2000, "step": torch.tensor(5.0 + g)}
                 for g in range(2)}
        torch.save({"optimizer_state_dict": {
            "single_partition_of_fp32_groups": groups,
            "base_optimizer_state": {"state": state},
            "param_slice_mappings": [{"dense.weight": SimpleNamespace(start=0, numel=2)},
                                     {"other.weight": SimpleNamespace(start=0, numel=2)}]}},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    got = stitched_zero_state(CheckpointRef(tmp_path, tag.name), 1, 4, ("fp32", "exp_avg", "exp_avg_sq", "step"))
    assert got["other.weight"]["fp32"].tolist() == [100, 101, 110, 111]
    assert got["other.weight"]["exp_avg"].tolist() == [1100, 1101, 1110, 1111]
    assert got["other.weight"]["exp_avg_sq"].tolist() == [2100, 2101, 2110, 2111]
    assert float(got["other.weight"]["step"]) == 6.0 and float(got["dense.weight"]["step"]) == 5.0
    only = stitched_zero_state(CheckpointRef(tmp_path, tag.name), 1, 4, ("fp32",), wanted={"other.weight"})
    assert list(only) == ["other.weight"]


def test_a_rank_holding_no_stepped_fragment_reports_what_the_others_saved(monkeypatch):
    """Every rank's answer is the agreement over ranks, not its own (a rank may hold no fragment)."""
    from m2r.engine import zero_state

    monkeypatch.setattr(zero_state, "_load_resharded", lambda engine, ref: (False, False))
    monkeypatch.setattr(dist, "max_over_ranks", lambda value: max(value, 1.0))   # another rank had stepped
    assert zero_state.load_resharded_optimizer_state(None, None).adamw is True


def _stub(topology, train, saved_train):
    from m2r.engine import run

    ref = SimpleNamespace(path=Path("/ck/step3"), saved_config=lambda: {"train": saved_train})
    stub = SimpleNamespace(topology=topology, POSITION="the data stream position", engine=None, ema=None,
                           cfg=SimpleNamespace(train=train))
    stub._global_batch_change = lambda r, s: run.TrainingRun._global_batch_change(stub, r, s)
    return run, stub, ref


def _warning(capsys, saved, current, same_ranks, carry, train=None, saved_train=None):
    train = train or SimpleNamespace(micro_batch=1, grad_accum=1)
    saved_train = saved_train or {"micro_batch": 1, "grad_accum": 1}
    run, stub, ref = _stub(current, train, saved_train)
    run.TrainingRun._warn_topology_change(stub, ref, saved, same_ranks, carry)
    return capsys.readouterr().out


def test_a_checkpoint_saved_before_the_first_step_still_carries_the_masters(monkeypatch):
    from m2r.engine import run
    from m2r.engine.zero_state import Resharded

    monkeypatch.setattr(run, "load_resharded_optimizer_state",
                        lambda engine, ref: Resharded(adamw=False, loss_scale=False))
    _, stub, ref = _stub(Topology(2, 1, "bf16", 1), None, None)
    carry = run.TrainingRun._carry_optimizer(stub, ref, Topology(1, 1, "bf16", 2))
    assert carry.masters and not carry.adamw and "precedes the first optimizer step" in carry.why_not


def test_the_carry_reports_the_loss_scale_the_re_partitioning_brought(monkeypatch):
    from m2r.engine import run
    from m2r.engine.zero_state import Resharded

    monkeypatch.setattr(run, "load_resharded_optimizer_state",
                        lambda engine, ref: Resharded(adamw=True, loss_scale=True))
    _, stub, ref = _stub(Topology(2, 1, "fp16", 1), None, None)
    carry = run.TrainingRun._carry_optimizer(stub, ref, Topology(1, 1, "fp16", 2))
    assert carry == (True, True, "", True)


def test_the_loss_scale_is_named_only_between_fp16_runs_and_lost_only_with_the_optimizer(capsys):
    from m2r.engine.run import OptimizerCarry

    carried = OptimizerCarry(masters=True, adamw=True, loss_scale=True)
    restart = OptimizerCarry(masters=False, adamw=False, why_not="the optimizer restarts: ZeRO stage 0")
    assert "loss scale" not in _warning(capsys, Topology(2, 2, "fp16", 1), Topology(2, 2, "bf16", 1), True, carried)
    kept = _warning(capsys, Topology(2, 2, "fp16", 1), Topology(4, 2, "fp16", 2), False, carried)
    assert "the fp16 loss scale" in kept.split("LOST")[0] and "loss scale" not in kept.split("LOST")[1]
    lost = _warning(capsys, Topology(2, 2, "fp16", 0), Topology(2, 2, "fp16", 1), True, restart)
    assert "the fp16 loss scale (starts again from its initial value)" in lost.split("LOST")[1]


def _fp16_shard_with_scaler(tmp_path, scaler, precision="fp16") -> "CheckpointRef":
    tag = tmp_path / "step00000400"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"world_size": 2, "ep_size": 1, "precision": precision,
                                               "zero_stage": 1}))
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler, "param_slice_mappings": [{}]}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return CheckpointRef(tmp_path, tag.name)


def _dynamic_scaler(scale_window=1000):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler(init_scale=2.0 ** 16, scale_window=scale_window, min_scale=1, delayed_shift=2,
                             consecutive_hysteresis=False)


def test_an_fp16_run_on_another_topology_continues_from_the_saved_loss_scale_with_its_own_settings(tmp_path):
    """Restarting at 2^16 would skip steps on overflows until the scale found its level again; the saved
    progress comes, the window (a setting) stays this run's."""
    from m2r.engine.zero_state import carry_loss_scale

    saved = _dynamic_scaler()
    saved.cur_scale, saved.cur_iter, saved.last_overflow_iter, saved.cur_hysteresis = 512.0, 4000, 3990, 1
    live = SimpleNamespace(loss_scaler=_dynamic_scaler(scale_window=50))
    assert carry_loss_scale(live, _fp16_shard_with_scaler(tmp_path, saved))
    scaler = live.loss_scaler
    progress = (scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis)
    assert progress == (512.0, 4000, 3990, 1)
    assert scaler.scale_window == 50


def test_a_loss_scale_comes_only_from_an_fp16_checkpoint_into_an_fp16_run(tmp_path):
    from m2r.engine.zero_state import carry_loss_scale

    saved = _dynamic_scaler()
    saved.cur_scale = 512.0
    bf16_ref = _fp16_shard_with_scaler(tmp_path / "bf16", saved, precision="bf16")
    live = SimpleNamespace(loss_scaler=_dynamic_scaler())
    assert not carry_loss_scale(live, bf16_ref) and live.loss_scaler.cur_scale == 2.0 ** 16
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    static = SimpleNamespace(loss_scaler=LossScaler(1.0))   # what a bf16 or fp32 ZeRO optimizer holds
    assert not carry_loss_scale(static, _fp16_shard_with_scaler(tmp_path / "fp16", saved))
    assert static.loss_scaler.cur_scale == 1.0


def test_the_masters_are_named_lost_only_when_a_low_precision_run_is_involved(capsys):
    from m2r.engine.run import OptimizerCarry

    restart = OptimizerCarry(masters=False, adamw=False, why_not="the optimizer restarts: ZeRO stage 0")
    low = _warning(capsys, Topology(2, 2, "bf16", 0), Topology(2, 2, "bf16", 1), True, restart)
    assert "the fp32 master weights (rebuilt from the low-precision module weights)" in low
    assert "fp32 master weights" not in _warning(capsys, Topology(2, 2, "fp32", 0), Topology(2, 2, "fp32", 1), True,
                                                 restart)


def test_the_global_batch_line_uses_the_checkpoints_own_batch_settings(capsys):
    from m2r.engine.run import OptimizerCarry

    out = _warning(capsys, Topology(2, 2, "fp32", 2), Topology(2, 2, "fp32", 1), True,
                   OptimizerCarry(masters=True, adamw=True), train=SimpleNamespace(micro_batch=2, grad_accum=1),
                   saved_train={"micro_batch": 1, "grad_accum": 2})
    assert "global batch" not in out   # 1*2*2 == 2*1*2
    out = _warning(capsys, Topology(2, 2, "fp32", 2), Topology(4, 2, "fp32", 2), False,
                   OptimizerCarry(masters=True, adamw=True), train=SimpleNamespace(micro_batch=1, grad_accum=1),
                   saved_train={"micro_batch": 1, "grad_accum": 4})
    assert "The global batch changes from 8 to 4 images per step" in out


def test_the_optimizer_follows_a_topology_change_between_zero_stages_1_and_2_only():
    from m2r.engine.zero_state import why_not_carried

    assert why_not_carried(Topology(8, 8, "bf16", 2), Topology(4, 2, "fp32", 1)) is None
    for saved, current in ((0, 1), (1, 0)):
        reason = why_not_carried(Topology(2, 1, "fp32", saved), Topology(1, 1, "fp32", current))
        assert "ZeRO stage 0" in reason


def test_a_resume_that_re_partitions_the_optimizer_also_carries_the_fp16_loss_scale(tmp_path, monkeypatch):
    from m2r.engine import zero_state

    saved = _dynamic_scaler()
    saved.cur_scale, saved.cur_iter = 512.0, 4000
    ref = _fp16_shard_with_scaler(tmp_path, saved)
    (ref.path / "config.yaml").write_text("model:\n  moe:\n    num_experts: 1\n")
    module = torch.nn.Linear(2, 1)
    masters = {name: {"fp32": torch.full((p.numel(),), 0.5)} for name, p in module.named_parameters()}
    monkeypatch.setattr(zero_state, "stitched_zero_state", lambda *args, **kwargs: masters)
    zero = SimpleNamespace(single_partition_of_fp32_groups=[], loss_scaler=_dynamic_scaler())
    zero_state._load_resharded(SimpleNamespace(optimizer=zero, module=module), ref)
    assert (zero.loss_scaler.cur_scale, zero.loss_scaler.cur_iter) == (512.0, 4000)


def test_a_static_saved_loss_scale_is_not_carried(tmp_path):
    """DeepSpeed's static LossScaler has no counters: the live dynamic scaler keeps its own."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from m2r.engine.zero_state import carry_loss_scale

    live = SimpleNamespace(loss_scaler=_dynamic_scaler())
    assert not carry_loss_scale(live, _fp16_shard_with_scaler(tmp_path, LossScaler(128.0)))
    assert live.loss_scaler.cur_scale == 2.0 ** 16


def test_a_checkpoint_before_the_first_step_still_carries_the_loss_scale_with_the_masters(capsys):
    """_load_resharded carries the scale whenever the masters come, stepped or not."""
    from m2r.engine.run import OptimizerCarry

    masters_only = OptimizerCarry(masters=True, adamw=False, loss_scale=True,
                                  why_not="none saved: the checkpoint precedes the first optimizer step")
    out = _warning(capsys, Topology(2, 2, "fp16", 1), Topology(4, 2, "fp16", 2), False, masters_only)
    assert "the fp16 loss scale" in out.split("LOST")[0] and "loss scale" not in out.split("LOST")[1]


def test_a_resume_at_the_same_topology_with_another_global_batch_says_the_lr_is_not_rescaled(capsys, monkeypatch):
    """train.grad_accum or train.micro_batch changed alone (no topology change, an exact load): the global batch
    changes as much as with a new world size, and the learning rate is as little rescaled."""
    from m2r.engine import run

    topology = Topology(2, 2, "fp32", 1)
    monkeypatch.setattr(run, "apply_optimizer_settings", lambda optimizer, train: None)
    for train, shown in ((SimpleNamespace(micro_batch=1, grad_accum=4), True),
                         (SimpleNamespace(micro_batch=2, grad_accum=1), False)):   # 4 -> 8 images per step; 4 -> 4
        _, stub, ref = _stub(topology, train, {"micro_batch": 1, "grad_accum": 2})
        ref.topology, ref.root, ref.tag = (lambda: topology), Path("/ck"), "step3"
        stub.optimizer = None
        stub.engine = SimpleNamespace(load_checkpoint=lambda root, tag: (None, {"step": 3, "rng_states": [{}, {}]}),
                                      module=torch.nn.Module(), zero_optimization=lambda: False)   # no experts, ZeRO
        client, saved_rng = run.TrainingRun._load_checkpoint(stub, ref)
        assert client["step"] == 3 and saved_rng == {}
        out = capsys.readouterr().out
        assert ("WARNING: resume: the global batch changes from 4 to 8 images per step; train.lr is not rescaled"
                in out) is shown, out


@pytest.mark.parametrize("position_kept", [False, True])
def test_a_finetune_epoch_whose_last_step_was_trained_is_not_named_lost_at_another_world_size(capsys, position_kept):
    """Saved at an epoch's last step (a signal before its validation), resumed at another world size: the epoch is
    validated next (`Finetuner._resume`), so the warning must not say its place was lost and started afresh."""
    from m2r.engine import run

    _, stub, ref = _stub(Topology(1, 1, "fp32", 1), SimpleNamespace(micro_batch=2, grad_accum=1),
                         {"micro_batch": 2, "grad_accum": 1})
    stub.POSITION = "the position in the epoch"
    carry = run.OptimizerCarry(masters=True, adamw=True)
    run.TrainingRun._warn_topology_change(stub, ref, Topology(2, 1, "fp32", 1), False, carry, position_kept)
    loaded, lost = capsys.readouterr().out.split("LOST")
    assert ("the position in the epoch (the epoch's last step was trained: it is validated next)" in loaded) \
        is position_kept
    assert ("the position in the epoch (started afresh)" in lost) is not position_kept
    assert "the per-rank RNG states" in lost


def test_only_a_finetune_checkpoint_at_an_epochs_last_step_keeps_its_place_at_another_world_size():
    from m2r.engine.finetuner import Finetuner
    from m2r.engine.run import TrainingRun

    assert Finetuner._position_kept_elsewhere(None, {"epoch_trained": True}) is True
    assert Finetuner._position_kept_elsewhere(None, {"epoch_trained": False}) is False
    assert Finetuner._position_kept_elsewhere(None, {}) is False   # saved before 2026-11-28
    assert TrainingRun._position_kept_elsewhere(None, {"epoch_trained": True}) is False


def test_a_re_partitioned_resume_gives_the_module_the_saved_fp32_masters_not_the_weights_it_loaded(monkeypatch):
    """After `load_weights_only` the module holds the checkpoint's module weights (bf16-rounded when saved in bf16):
    the re-partitioning overwrites them with the fp32 masters, so module and optimizer agree, as after a step."""
    from m2r.engine import zero_state

    zero, flat, _ = _partition_holding(tail_of_a=4, head_of_b=3)
    module = torch.nn.Module()
    module.a, module.b = zero.bit16_groups[0]
    masters = {"a": torch.tensor([1.0 + 2 ** -12, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0, 7.0 + 2 ** -12])}
    with torch.no_grad():   # the module weights as loaded: the masters rounded to bf16
        module.a.copy_(masters["a"].bfloat16()), module.b.copy_(masters["b"].bfloat16())
    monkeypatch.setattr(zero_state, "stitched_zero_state", lambda *args, **kwargs: {
        name: {"fp32": master.clone()} for name, master in masters.items()})
    ref = SimpleNamespace(saved_config=lambda: {"model": {"moe": {"num_experts": 1}}},
                          topology=lambda: Topology(2, 1, "bf16", 1))
    assert zero_state._load_resharded(SimpleNamespace(optimizer=zero, module=module), ref) == (False, False)
    assert torch.equal(module.a, masters["a"]) and torch.equal(module.b, masters["b"])
    assert torch.equal(flat[:7], torch.cat([masters["a"], masters["b"]]))


def test_the_fragments_of_a_64_rank_job_are_joined_in_numeric_rank_order(tmp_path):
    """Ranks 10 to 63 sort after rank 9, not between 1 and 2 as their names would: a 64-GPU checkpoint re-partitioned
    elsewhere gets each weight in its own order."""
    from m2r.engine.zero_state import stitched_zero_state

    tag = tmp_path / "step00000001"
    tag.mkdir()
    for rank in range(64):   # each rank holds one value of the dense weight: its rank
        torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [torch.tensor([float(rank)])],
                                             "param_slice_mappings": [{"dense.weight": SimpleNamespace(start=0,
                                                                                                      numel=1)}]}},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    stitched = stitched_zero_state(CheckpointRef(tmp_path, tag.name), ep_size=1, num_experts=4)
    assert stitched["dense.weight"]["fp32"].tolist() == list(range(64))
