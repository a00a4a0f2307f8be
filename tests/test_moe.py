"""Specification of the DDER mixture-of-experts adapter (m2r/models/moe.py)."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from m2r.models.config import MoEConfig
from m2r.models.moe import (DDER, ExpertMLP, Routing, combine_expert_outputs, cv_squared, dense_gate_matrix,
                            dropped_assignments, init_expert_, resolve_dispatch, sort_assignments)

DIM, PROMPT_DIM, NUM_PROMPTS = 8, 12, 6
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_dder(dtype=torch.float32, layer_id=0, seed=3, **moe_overrides):
    torch.manual_seed(0)
    return DDER(DIM, PROMPT_DIM, NUM_PROMPTS, replace(MoEConfig(), **moe_overrides), layer_id, seed).to(dtype)


def make_inputs(batch=2, height=4, width=4, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, DIM, height, width, generator=generator, dtype=dtype)
    prompt = torch.randn(batch, PROMPT_DIM, generator=generator, dtype=dtype)
    probs = torch.softmax(torch.randn(batch, NUM_PROMPTS, generator=generator, dtype=dtype), dim=1)
    return x, prompt, probs


def test_output_shapes_and_expert_load_fractions():
    dder = make_dder()
    y, balance_loss, expert_load, dropped = dder(*make_inputs(batch=2, height=4, width=6))
    assert y.shape == (2, DIM, 4, 6)
    assert balance_loss.shape == () and balance_loss.requires_grad
    assert expert_load.shape == (6,) and not expert_load.requires_grad
    assert expert_load.sum().item() == pytest.approx(1.0)


def test_noise_only_in_training():
    dder = make_dder()
    inputs = make_inputs()
    dder.eval()
    torch.manual_seed(10)
    eval_a = dder(*inputs)[0]
    torch.manual_seed(11)
    eval_b = dder(*inputs)[0]
    assert torch.equal(eval_a, eval_b)

    dder.train()
    train_a, train_b = dder(*inputs)[0], dder(*inputs)[0]
    assert not torch.allclose(train_a, train_b)

    dder.router.noisy_gating = False
    assert torch.equal(dder(*inputs)[0], eval_a)


def test_gates_sum_to_one_over_exactly_k_distinct_experts():
    dder = make_dder(top_k=2).train()
    x, prompt, probs = make_inputs()
    tokens = x.permute(0, 2, 3, 1).reshape(-1, DIM)
    routing = dder.router(tokens, dder.prompt_proj(prompt), probs, tokens_per_image=16)
    assert routing.gates.dtype == torch.float32
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(tokens.shape[0]))
    dense = torch.zeros(tokens.shape[0], 6).scatter(1, routing.expert_ids, routing.gates)
    assert ((dense > 0).sum(1) == 2).all()


def official_reference(dder, x, task_prompt, clip_probs, noise):
    """The official algorithm restated densely (every expert on every token), independently of moe.py."""
    batch, dim, height, width = x.shape
    router, experts = dder.router, dder.deepspeed_moe.experts.deepspeed_experts
    k = dder.top_k
    tokens = x.permute(0, 2, 3, 1).reshape(-1, dim)
    x_p = torch.cat([tokens, dder.prompt_proj(task_prompt).repeat_interleave(height * width, 0)], dim=1)
    clean = x_p @ router.w_g
    logits = clean + router.gate_boost * router.degra_proj(clip_probs).repeat_interleave(height * width, 0)
    noise_std = F.softplus(x_p @ router.w_n) + 0.01
    if noise is not None:
        logits = logits + noise * noise_std
    top_values, top_ids = logits.topk(k + 1, dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_ids[:, :k], torch.softmax(top_values[:, :k], dim=1))

    if noise is not None:
        normal = torch.distributions.Normal(0.0, 1.0)
        threshold_in, threshold_out = top_values[:, k:k + 1], top_values[:, k - 1:k]
        load = torch.where(logits > threshold_in, normal.cdf((clean - threshold_in) / noise_std),
                           normal.cdf((clean - threshold_out) / noise_std)).sum(0)
    else:
        load = (gates > 0).sum(0).to(logits.dtype)
    importance = gates.sum(0)
    balance = sum(v.var() / (v.mean() ** 2 + 1e-10) for v in (importance, load))

    expert_outputs = torch.stack([expert(tokens) for expert in experts], dim=1)  # (S, E, C)
    mixed = (gates.unsqueeze(2) * expert_outputs.exp()).sum(1)
    mixed = torch.where(mixed == 0, torch.full_like(mixed, 2.220446049250313e-16), mixed).log()
    return x + mixed.view(batch, height, width, dim).permute(0, 3, 1, 2), balance


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_dense_restatement_of_official_algorithm(training, dispatch):
    dder = make_dder(dtype=torch.float64, dispatch=dispatch).train(training)
    with torch.no_grad():
        dder.router.w_n.normal_(0, 0.3)   # official init is zero: make the noise scale token dependent
    x, prompt, probs = (t.requires_grad_(True) for t in make_inputs(dtype=torch.float64))
    noise = None
    if training:
        torch.manual_seed(5)
        noise = torch.randn(2 * 16, 6, dtype=torch.float64)
    torch.manual_seed(5)
    y, balance_loss, _, _ = dder(x, prompt, probs)
    ((y * y.detach().cos()).sum() + balance_loss).backward()
    ours = collect_grads([x, *dder.parameters()])

    ref_y, ref_balance = official_reference(dder, x, prompt, probs, noise)
    ((ref_y * ref_y.detach().cos()).sum() + ref_balance).backward()
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(balance_loss, ref_balance, rtol=1e-12, atol=1e-12)
    for our_grad, ref_grad in zip(ours, collect_grads([x, *dder.parameters()])):
        assert (our_grad is None) == (ref_grad is None)     # w_n gets no gradient without noise
        if ref_grad is not None:
            torch.testing.assert_close(our_grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_dense_dispatch_runs_large_inputs_in_token_chunks_with_the_same_result(monkeypatch):
    # Above MAX_GEMM_ELEMENTS (cuBLAS's limit) the dense experts run on chunks of tokens; forced here
    # to chunks of 5 of the 32 tokens (the last one shorter), in training, with a capacity.
    from m2r.models import moe

    def output_and_grads(dder):
        x, prompt, probs = (t.requires_grad_(True) for t in make_inputs(dtype=torch.float64))
        torch.manual_seed(5)
        y, balance_loss, _, _ = dder(x, prompt, probs)
        ((y * y.detach().cos()).sum() + balance_loss).backward()
        return y.detach(), collect_grads([x, *dder.parameters()])

    settings = dict(dispatch="dense", capacity_factor=0.6)
    whole_y, whole_grads = output_and_grads(make_dder(torch.float64, **settings).train())
    chunk_sizes = []
    run_experts = moe.run_experts_densely
    monkeypatch.setattr(moe, "run_experts_densely",
                        lambda experts, tokens: chunk_sizes.append(len(tokens)) or run_experts(experts, tokens))
    monkeypatch.setattr(moe, "MAX_GEMM_ELEMENTS", 5 * 6 * int(2.66 * DIM))
    chunked_y, chunked_grads = output_and_grads(make_dder(torch.float64, **settings).train())

    assert chunk_sizes == [5] * 6 + [2]
    torch.testing.assert_close(chunked_y, whole_y, rtol=0, atol=1e-12)
    for chunked, whole in zip(chunked_grads, whole_grads):
        assert (chunked is None) == (whole is None)
        if whole is not None:
            torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12)


def collect_grads(tensors):
    """Take (and clear) the .grad of each tensor."""
    grads = [t.grad for t in tensors]
    for tensor in tensors:
        tensor.grad = None
    return grads


def test_cv_squared_hand_values():
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1.0 / 4.0)  # unbiased var 1, mean 2
    assert cv_squared(torch.tensor([4, 4, 4, 4])).item() == 0.0
    assert cv_squared(torch.tensor([7.0])).item() == 0.0


def test_balance_loss_is_zero_for_perfectly_balanced_routing():
    dder = make_dder(num_experts=2, top_k=1).eval()
    with torch.no_grad():
        for param in dder.router.parameters():
            param.zero_()
        dder.router.w_g[0] = torch.tensor([1.0, -1.0])   # channel 0 > 0 -> expert 0, < 0 -> expert 1
    x = torch.zeros(1, DIM, 2, 2)
    x[0, 0] = torch.tensor([[1.0, -1.0], [-2.0, 2.0]])
    _, balance_loss, expert_load, _ = dder(x, torch.zeros(1, PROMPT_DIM), torch.full((1, NUM_PROMPTS), 1 / 6))
    assert balance_loss.item() == 0.0
    assert expert_load.tolist() == [0.5, 0.5]


def test_log_and_linear_combine_on_a_hand_example():
    """Token 3's exp underflows to an exact 0, which the official log combine replaces by eps; token 2, every
    choice dropped by a capacity, gets nothing from its experts in either mode (only its residual is left)."""
    outputs = torch.tensor([[0.0], [1.0], [2.0], [-200.0]])   # expert outputs of four assignments
    gates = torch.tensor([0.25, 0.75, 1.0, 1.0])
    token_ids = torch.tensor([0, 0, 1, 3])               # token 0 uses two experts, tokens 1 and 3 one, token 2 none
    log_mixed = combine_expert_outputs(outputs, gates, token_ids, num_tokens=4, mode="log")
    expected_log = [torch.log(torch.tensor(0.25 + 0.75 * torch.e)).item(), 2.0, 0.0,
                    torch.log(torch.tensor(2.0 ** -52)).item()]
    torch.testing.assert_close(log_mixed[:, 0], torch.tensor(expected_log))
    linear_mixed = combine_expert_outputs(outputs, gates, token_ids, num_tokens=4, mode="linear")
    torch.testing.assert_close(linear_mixed[:, 0], torch.tensor([0.75, 2.0, 0.0, -200.0]))


def expert_weights(expert):
    return torch.cat([p.detach().flatten() for p in expert.parameters()])


def test_experts_are_distinct_and_independent_of_ep_size():
    dder = make_dder(layer_id=2, seed=3)
    experts = dder.deepspeed_moe.experts.deepspeed_experts
    weights = [expert_weights(e) for e in experts]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(6) for j in range(i))

    # At ep_size=2, rank 1 holds global experts 3..5 as its local experts 0..2 and seeds them by global id.
    for local_id in range(3):
        rank1_expert = ExpertMLP(DIM, int(2.66 * DIM))
        init_expert_(rank1_expert, seed=3, layer_id=2, global_expert_id=3 + local_id)
        assert torch.equal(expert_weights(rank1_expert), weights[3 + local_id])

    other_layer = make_dder(layer_id=3, seed=3)
    assert not torch.equal(expert_weights(other_layer.deepspeed_moe.experts.deepspeed_experts[0]), weights[0])
    assert torch.equal(other_layer.router.w_g, dder.router.w_g)   # the router comes from the ambient RNG


def test_capacity_drops_assignments_beyond_it_in_token_order():
    expert_ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    routing = Routing(expert_ids, torch.full((4, 2), 0.5), torch.zeros(()))
    kept = sort_assignments(routing, num_experts=3, capacity=2)
    assert kept.counts_per_expert.tolist() == [2, 2, 1]
    assert kept.token_ids.tolist() == [0, 1, 0, 2, 1]      # expert 0 keeps tokens 0, 1; drops 2, 3
    assert dense_gate_matrix(routing, num_experts=3, capacity=2).tolist() == [
        [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]


def test_the_dropped_count_is_what_the_capacity_leaves_out_of_both_dispatches():
    """Expert 0 is chosen 4 times and expert 1 3 times under a capacity of 2: 2 + 1 of the 8 assignments
    are dropped; a zero gate (underflowed) takes no place, so it is neither kept nor dropped."""
    routing = Routing(torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]]), torch.full((4, 2), 0.5), torch.zeros(()))
    assert dropped_assignments(routing, num_experts=3, capacity=2).item() == 3.0
    assert sort_assignments(routing, num_experts=3, capacity=2).token_ids.numel() == 8 - 3
    assert (dense_gate_matrix(routing, num_experts=3, capacity=2) > 0).sum().item() == 8 - 3
    assert dropped_assignments(routing, num_experts=3, capacity=4).item() == 0.0
    assert dropped_assignments(routing, num_experts=3, capacity=None).item() == 0.0   # no capacity

    zero_gate = Routing(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.zeros(()))
    assert dropped_assignments(zero_gate, num_experts=2, capacity=1).item() == 1.0   # token 1's expert 0
    assert sort_assignments(zero_gate, num_experts=2, capacity=1).token_ids.numel() == 3 - 1


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_an_adapter_reports_the_fraction_of_its_assignments_the_capacity_dropped(dispatch):
    """In training with model.moe.capacity_factor (evaluation: eval_capacity_factor), over the S * k
    assignments the load counts too; 0 without a capacity."""
    x, prompt, probs = make_inputs()
    tokens = x.permute(0, 2, 3, 1).reshape(-1, DIM)
    for factor, train in ((0.4, True), (0.4, False), (0.0, True)):
        dder = make_dder(top_k=2, capacity_factor=factor if train else 0.0,
                         eval_capacity_factor=0.0 if train else factor, noisy_gating=False,
                         dispatch=dispatch).train(train)
        with torch.no_grad():
            dropped = dder(x, prompt, probs)[3]
            routing = dder.router(tokens, dder.prompt_proj(prompt), probs, tokens_per_image=16)
        capacity = 5 if factor else None    # ceil(0.4 * 32 tokens * 2 / 6 experts)
        kept = sort_assignments(routing, 6, capacity).token_ids.numel()
        assert dropped.dtype == torch.float32 and dropped.shape == () and not dropped.requires_grad
        assert dropped.item() == pytest.approx((64 - kept) / 64)
        assert (dropped.item() > 0) == (factor > 0)


@pytest.mark.parametrize("combine", ["log", "linear"])
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_capacity_keeps_exactly_the_first_assignments_per_expert(dispatch, combine):
    """A token whose every choice is dropped keeps only its residual in either combine (log mode's log(eps)
    would shift it by -36)."""
    uncapped = make_dder(combine=combine, dispatch=dispatch).eval()
    capped = make_dder(combine=combine, eval_capacity_factor=0.4, dispatch=dispatch).eval()   # 5 per expert kept
    x, prompt, probs = make_inputs()
    tokens = x.permute(0, 2, 3, 1).reshape(-1, DIM)
    routing = capped.router(tokens, capped.prompt_proj(prompt), probs, tokens_per_image=16)
    kept_per_token = torch.bincount(sort_assignments(routing, 6, capacity=5).token_ids, minlength=32)
    assert set(kept_per_token.tolist()) == {0, 1, 2}

    token_rows = lambda y: y.permute(0, 2, 3, 1).reshape(-1, DIM)
    y_uncapped, y_capped = token_rows(uncapped(x, prompt, probs)[0]), token_rows(capped(x, prompt, probs)[0])
    fully_kept, partly_kept, dropped = (kept_per_token == n for n in (2, 1, 0))
    torch.testing.assert_close(y_capped[fully_kept], y_uncapped[fully_kept])
    assert ((y_capped[partly_kept] - y_uncapped[partly_kept]).abs().amax(dim=1) > 1e-3).all()
    assert torch.equal(y_capped[dropped], tokens[dropped])      # only the residual is left


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_the_training_capacity_is_not_applied_in_evaluation(dispatch):
    # The cap counts tokens over the whole batch: applied in evaluation, an image's output would depend
    # on the images beside it. The default evaluation cap (0) keeps every token.
    capped = make_dder(combine="linear", capacity_factor=0.4, noisy_gating=False, dispatch=dispatch)
    x, prompt, probs = make_inputs()
    with torch.no_grad():
        batch_of_two = capped.eval()(x, prompt, probs)[0]
        alone = torch.cat([capped(x[i:i + 1], prompt[i:i + 1], probs[i:i + 1])[0] for i in range(2)])
        trained_view = capped.train()(x, prompt, probs)[0]
    torch.testing.assert_close(batch_of_two, alone)
    assert not torch.allclose(trained_view, batch_of_two)   # the cap does drop tokens in training


@pytest.mark.parametrize("combine", ["log", "linear"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.4])
def test_dense_and_sparse_dispatch_give_the_same_layer(combine, capacity_factor):
    x, prompt, probs = make_inputs(dtype=torch.float64)
    outputs = [make_dder(torch.float64, combine=combine, eval_capacity_factor=capacity_factor, dispatch=dispatch)
               .eval()(x, prompt, probs)[0] for dispatch in ("sparse", "dense")]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (dict(ep_size=4), r"model\.moe\.ep_size=4 must divide model\.moe\.num_experts=6"),
    (dict(top_k=7), r"model\.moe\.top_k=7"),
    (dict(combine="mean"), r"model\.moe\.combine='mean'"),
    (dict(capacity_factor=-1.0), r"model\.moe\.capacity_factor=-1\.0"),
    (dict(eval_capacity_factor=-1.0), r"model\.moe\.eval_capacity_factor=-1\.0"),
    (dict(dispatch="scatter"), r"model\.moe\.dispatch='scatter'"),
])
def test_invalid_config_raises_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_dder(**overrides)


def test_dense_dispatch_refuses_expert_parallelism():
    with pytest.raises(ValueError, match=r"model\.moe\.dispatch='dense' needs ep_size 1"):
        make_dder(dispatch="dense", ep_size=2)


def test_auto_dispatch_is_dense_alone_and_sparse_with_expert_parallelism():
    assert make_dder().dispatch == "dense"
    assert resolve_dispatch(replace(MoEConfig(), ep_size=2)) == "sparse"
    assert make_dder(dispatch="sparse").dispatch == "sparse"


@pytest.mark.parametrize("capacity_factor", [0.0, 0.4])
def test_dense_dispatch_compiles_without_graph_breaks(capacity_factor):
    """With a capacity too: the dropped fraction is counted from per-expert totals, static shapes."""
    dder = make_dder(dispatch="dense", capacity_factor=capacity_factor).train()
    explanation = torch._dynamo.explain(dder)(*make_inputs())
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_an_overflowing_unused_expert_leaves_other_tokens_finite():
    """Dense dispatch runs experts a token does not use; their exp() may overflow but must not leak."""
    dder = make_dder(combine="log", dispatch="dense").eval()
    with torch.no_grad():
        dder.deepspeed_moe.experts.deepspeed_experts[0].fc2.bias.fill_(1e3)
    x, prompt, probs = make_inputs()
    x.requires_grad_(True)
    y = dder(x, prompt, probs)[0]
    tokens = x.detach().permute(0, 2, 3, 1).reshape(-1, DIM)
    routing = dder.router(tokens, dder.prompt_proj(prompt), probs, tokens_per_image=16)
    unaffected = (routing.expert_ids != 0).all(1).view(2, 4, 4)
    assert unaffected.any() and not unaffected.all()
    rows = y.permute(0, 2, 3, 1)[unaffected]
    assert torch.isfinite(rows).all()
    rows.sum().backward()
    assert torch.isfinite(x.grad.permute(0, 2, 3, 1)[unaffected]).all()


def test_expert_parallel_without_distributed_raises():
    with pytest.raises(RuntimeError, match=r"model\.moe\.ep_size=2 needs torch\.distributed"):
        make_dder(ep_size=2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor):
                self.max_bytes = max(self.max_bytes, tensor.numel() * tensor.element_size())
        return out


def test_sparse_dispatch_memory_is_linear_in_tokens():
    dder = make_dder(dispatch="sparse").train()
    x, prompt, probs = make_inputs(batch=2, height=320, width=320)   # 204,800 tokens
    x.requires_grad_(True)
    with LargestTensor() as largest:
        y, balance_loss, _, _ = dder(x, prompt, probs)
        (y.sum() + balance_loss).backward()
    num_assignments, hidden = 204_800 * 2, int(2.66 * DIM)
    # Linear bound: all assignments' hidden activations at once. A dense [S, E, capacity] tensor is ~10^4x more.
    assert largest.max_bytes <= num_assignments * hidden * 4


def test_deepspeed_sees_a_moe_layer_with_expert_params():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    dder = make_dder()
    assert isinstance(dder, MoE) and dder.num_local_experts == 6 and dder.expert_group_name == "ep_size_1"
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(dder.parameters()), "name": "all"})
    expert_params = {id(p) for group in groups if group.get("moe") for p in group["params"]}
    names_by_id = {id(p): name for name, p in dder.named_parameters()}
    assert {names_by_id[i] for i in expert_params} == {n for n in names_by_id.values() if "deepspeed_moe" in n}
    assert not any("expert" in name for name in names_by_id.values() if "deepspeed_moe" not in name)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_rank_expert_parallel_matches_single_rank_and_checkpoints_by_global_id(tmp_path):
    result_path = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO_ROOT / "tests" / "dist_moe_parity.py"), str(result_path), str(tmp_path / "checkpoints")]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(result_path.read_text())

    for case, diffs in result["parity"].items():
        assert len(diffs) == 7 + 7 + 2 * 4 * 6, case     # outputs (dropped too), router grads, expert grads and weights
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] < 1e-12, f"{case}: {worst} differs by {diffs[worst]}"

    checkpoint = result["checkpoint"]
    assert {f"layer_0_expert_{g}_mp_rank_00_model_states.pt" for g in range(6)} <= set(checkpoint["files"])
    assert "adapter.router.w_g" in checkpoint["main_module_keys"]
    assert not any("deepspeed_moe" in key for key in checkpoint["main_module_keys"])
    assert checkpoint["expert4_keys"] == [f"adapter.deepspeed_moe.experts.deepspeed_experts.4.{name}"
                                          for name in ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight")]
    assert checkpoint["before_load_max_diff"] > 1e-4 and checkpoint["reload_max_diff"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_dispatch_past_the_cublas_operand_limit_matches_sparse_on_cuda():
    # 2.89 M tokens of 48 channels: one GEMM over all of them would span 2.2e9 elements, past the 2^31
    # at which cuBLASLt 13.x fails; the dense path splits them and must still equal the sparse one.
    assert_dense_matches_sparse(torch.device("cuda"), dim=48, side=1700)


def assert_dense_matches_sparse(device, dim, side):
    cfg = MoEConfig(noisy_gating=False)
    torch.manual_seed(0)
    dense = DDER(dim, PROMPT_DIM, NUM_PROMPTS, replace(cfg, dispatch="dense"), 0, 3).to(device).eval()
    sparse = DDER(dim, PROMPT_DIM, NUM_PROMPTS, replace(cfg, dispatch="sparse"), 0, 3).to(device).eval()
    sparse.load_state_dict(dense.state_dict())
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, dim, side, side, device=device, generator=generator)
    prompt = torch.randn(1, PROMPT_DIM, device=device, generator=generator)
    probs = torch.softmax(torch.randn(1, NUM_PROMPTS, device=device, generator=generator), dim=1)
    with torch.no_grad():   # fp32 matmuls stay fp32 (torch's default: no TF32)
        y_dense, y_sparse = dense(x, prompt, probs)[0], sparse(x, prompt, probs)[0]
    torch.testing.assert_close(y_dense, y_sparse, rtol=1e-4, atol=1e-4)


def test_consecutive_ranks_form_an_expert_parallel_group_and_the_first_group_saves_the_experts():
    from m2r.models.moe import expert_parallel_rank, is_first_expert_replica

    assert [expert_parallel_rank(rank, 2) for rank in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [is_first_expert_replica(rank, 2) for rank in range(6)] == [True, True, False, False, False, False]


def test_top_k_equal_to_the_number_of_experts_trains_with_noisy_gating():
    """top_k = num_experts is a valid config: no (k+1)-th logit exists, so the load counts assignments
    (every expert takes every token) instead of Shazeer's estimator."""
    for dispatch in ("dense", "sparse"):
        dder = make_dder(num_experts=2, top_k=2, dispatch=dispatch).train()
        y, balance_loss, expert_load, _ = dder(*make_inputs())
        assert torch.isfinite(y).all() and torch.isfinite(balance_loss)
        assert expert_load.tolist() == [0.5, 0.5]


def test_an_assignment_whose_gate_is_zero_takes_no_place_under_the_capacity():
    """A gate that underflowed to 0 is dropped (as official) before the capacity counts, in both
    dispatch paths: token 1 keeps its place at expert 1 although token 0 chose it first with gate 0."""
    routing = Routing(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.zeros(()))
    kept = sort_assignments(routing, num_experts=2, capacity=1)
    assert kept.token_ids.tolist() == [0, 1] and kept.gates.tolist() == [1.0, 0.5]
    assert kept.counts_per_expert.tolist() == [1, 1]
    assert dense_gate_matrix(routing, num_experts=2, capacity=1).tolist() == [[1.0, 0.0], [0.0, 0.5]]


def test_expert_load_is_the_fraction_of_top_k_assignments_per_expert():
    dder = make_dder(top_k=2).eval()
    x, prompt, probs = make_inputs(batch=2, height=4, width=6)
    _, _, expert_load, _ = dder(x, prompt, probs)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, DIM)
    routing = dder.router(tokens, dder.prompt_proj(prompt), probs, tokens_per_image=24)
    expected = torch.bincount(routing.expert_ids.flatten(), minlength=6).double() / routing.expert_ids.numel()
    assert not torch.allclose(expected, torch.full((6,), 1 / 6, dtype=torch.float64))   # not a balanced example
    torch.testing.assert_close(expert_load.double(), expected)


def test_the_load_estimate_leaves_the_clip_bias_out_unless_asked(monkeypatch):
    """A CLIP bias that sends every token to expert 0: Shazeer's estimate from the routed logits says
    expert 0 keeps all 16 tokens (moe.load_with_clip_bias, the plus config); the official estimate starts
    from the logits without the bias and balances a routing that never ran."""
    from m2r.models import moe

    estimate, estimates = moe.smooth_load, []
    monkeypatch.setattr(moe, "smooth_load", lambda *args: estimates.append(estimate(*args)) or estimates[-1])
    for with_bias in (True, False):
        dder = make_dder(num_experts=4, top_k=1, load_with_clip_bias=with_bias).train()
        router = dder.router
        with torch.no_grad():
            router.w_g.zero_(), router.w_n.zero_(), router.degra_proj.weight.zero_(), router.gate_boost.fill_(1.0)
            router.degra_proj.bias.copy_(torch.tensor([40.0, 0.0, 0.0, 0.0]))
        _, _, expert_load, _ = dder(*make_inputs(batch=1, height=4, width=4))
        assert expert_load.tolist() == [1.0, 0.0, 0.0, 0.0]   # the routing itself, either way
    with_bias, without = (load[0].item() for load in estimates)
    assert with_bias == pytest.approx(16.0, abs=1e-3) and without < 8.0
