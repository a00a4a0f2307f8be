"""DDER: the per-pixel sparse mixture-of-experts adapter of M2Restore (official code class `MCDB`).

Every pixel of a (B, C, H, W) feature map is one token. A router that sees the pixel's features and the
image's task prompt, biased by the frozen CLIP degradation probabilities, sends each token to its top-k
experts (token-wise MLPs); the experts' outputs are mixed by the gates and added back to the input.

The experts are DeepSpeed MoE experts, so DeepSpeed's engine treats this layer as a native MoE layer:
ZeRO param groups, gradient all-reduce over the expert-data-parallel group, and `save_checkpoint`
writing one `layer_<L>_expert_<G>_...` file per global expert id. Routing and dispatch are our own:
DeepSpeed's gate has no CLIP bias, no Shazeer load estimator and builds capacity-padded buffers,
while here either every expert runs on every token and the gates mask the result ("dense", static
shapes: the default without expert parallelism) or tokens move by index (memory linear in tokens * k)
and, with ep_size > 1, through a variable-split all-to-all over DeepSpeed's expert-parallel group.

State-dict layout of one DDER (global expert id = ep_rank * num_local_experts + local id):
    prompt_proj.{weight,bias}                                  task prompt -> C
    router.{w_g, w_n, gate_boost, degra_proj.weight, degra_proj.bias}
    deepspeed_moe.experts.deepspeed_experts.<local id>.{fc1,fc2}.{weight,bias}
DeepSpeed files every key containing "expert" under a MoE layer as an expert key: no other name here
(nor the path to a DDER inside the network) may contain "expert".
"""
import hashlib
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from m2r import dist
from m2r.dist import announce_once
from m2r.models.config import COMBINE_MODES, DISPATCH_MODES

dist.name_deepspeeds_accelerator()   # the tools (evaluate, restore, export) import DeepSpeed through here
from deepspeed.moe.experts import Experts  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.utils import groups  # noqa: E402

NOISE_FLOOR = 1e-2          # added to softplus(noise logits): Shazeer's minimum noise std (official value)
CV2_EPS = 1e-10             # keeps cv^2 finite when an expert vector sums to zero (official value)
LOG_COMBINE_EPS = torch.finfo(torch.float64).eps  # official: numpy float eps replaces exact zeros before log
# cuBLASLt 13.x fails (CUBLAS_STATUS_EXECUTION_FAILED) on a GEMM whose operand spans 2^31 elements or
# more (NVIDIA/raft#3097): the dense path runs its experts on chunks of tokens below that. One chunk
# at training crops; several from about 2.8 M tokens (a 840 px crop at batch 4, a 2048x1400 image).
MAX_GEMM_ELEMENTS = 2 ** 31 - 1


class ExpertMLP(nn.Module):
    """One expert: a token-wise MLP C -> hidden -> C (official `Mlp`, dropout 0 so omitted)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


def expert_generator(seed: int, layer_id: int, global_expert_id: int) -> torch.Generator:
    """A CPU generator seeded from the three ints, so an expert's init does not depend on ep_size."""
    digest = hashlib.sha256(f"m2r-expert/{seed}/{layer_id}/{global_expert_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def init_expert_(expert: nn.Module, seed: int, layer_id: int, global_expert_id: int) -> None:
    """Re-draw every Linear of `expert` as torch's default Linear init, from the expert's own generator.

    torch's default (kaiming_uniform with a=sqrt(5), and its bias rule) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weight and bias alike. Values are drawn on the CPU and copied, so the device does not matter.
    """
    generator = expert_generator(seed, layer_id, global_expert_id)
    for linear in (m for m in expert.modules() if isinstance(m, nn.Linear)):
        bound = 1.0 / math.sqrt(linear.in_features)
        for param in (linear.weight, linear.bias):
            if param is not None:
                drawn = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                param.copy_(drawn)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var (unbiased, as official) / (mean^2 + eps); 0 for one expert."""
    values = _at_least_fp32(values)
    if values.numel() == 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + CV2_EPS)


def _standard_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def smooth_load(clean_logits, noisy_logits, noise_std, top_logits, k: int) -> torch.Tensor:
    """Shazeer's differentiable load: per expert, the summed probability that it stays in the top k.

    An expert currently in the top k stays in if its noisy logit beats the (k+1)-th largest; one outside
    gets in if it beats the k-th. `clean_logits`: the logits before the noise (official quirk, kept by
    default: without the CLIP bias that the routing added; `Router.load_with_clip_bias` adds it).
    """
    threshold_if_in = top_logits[:, k:k + 1]
    threshold_if_out = top_logits[:, k - 1:k]
    is_in = noisy_logits > threshold_if_in
    prob_if_in = _standard_normal_cdf((clean_logits - threshold_if_in) / noise_std)
    prob_if_out = _standard_normal_cdf((clean_logits - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _per_token(per_image: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    return per_image.repeat_interleave(tokens_per_image, dim=0)


def _count_per_expert(expert_ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor] = None):
    """Sum of `weights` (default 1) per expert id, as a (num_experts,) float tensor.

    An index_add rather than bincount: its output shape does not depend on the data, so it compiles.
    """
    ids = expert_ids.flatten()
    weights = torch.ones_like(ids, dtype=torch.float32) if weights is None else weights.flatten()
    return weights.new_zeros(num_experts).index_add(0, ids, weights)


@dataclass
class Routing:
    expert_ids: torch.Tensor    # (S, k) int64, best first
    gates: torch.Tensor         # (S, k) fp32 (or fp64), softmax over the k chosen logits
    balance_loss: torch.Tensor  # scalar, cv^2(importance) + cv^2(load)


class Router(nn.Module):
    """Noisy top-k router on [x, prompt] with the CLIP bias `gate_boost * degra_proj(clip_probs)`.

    Names mirror the official `model` class (w_g, w_n, degra_proj, gate_boost). The prompt half of the
    router input is the same for every pixel of an image, so its product with the weights is computed
    once per image instead of materialising the (S, 2C) concatenation.
    """

    def __init__(self, dim: int, num_prompts: int, num_experts: int, top_k: int, noisy_gating: bool,
                 clip_bias_init: float, load_with_clip_bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noisy_gating = noisy_gating
        self.load_with_clip_bias = load_with_clip_bias
        self.w_g = nn.Parameter(torch.randn(2 * dim, num_experts))   # unscaled normal, as official
        self.w_n = nn.Parameter(torch.zeros(2 * dim, num_experts))
        self.degra_proj = nn.Linear(num_prompts, num_experts)
        # Shape (1,), not the official 0-dim: DeepSpeed 0.19's engine cannot broadcast 0-dim parameters.
        self.gate_boost = nn.Parameter(torch.full((1,), float(clip_bias_init)))

    def _project(self, weight, tokens, prompt, tokens_per_image):
        """[tokens, prompt broadcast over the image] @ weight, without building the concatenation."""
        dim = tokens.shape[1]
        weight = weight.to(tokens.dtype)
        return tokens @ weight[:dim] + _per_token(prompt @ weight[dim:], tokens_per_image)

    def _clip_bias(self, clip_probs, tokens_per_image):
        dtype = clip_probs.dtype
        per_image = F.linear(clip_probs, self.degra_proj.weight.to(dtype), self.degra_proj.bias.to(dtype))
        return self.gate_boost.to(dtype) * _per_token(per_image, tokens_per_image)

    def forward(self, tokens, prompt, clip_probs, tokens_per_image: int) -> Routing:
        # Routing decisions are discrete: keep them at fp32 or better, whatever the autocast or param dtype.
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            tokens, prompt, clip_probs = (_at_least_fp32(t) for t in (tokens, prompt, clip_probs))
            unbiased = self._project(self.w_g, tokens, prompt, tokens_per_image)
            logits = unbiased + self._clip_bias(clip_probs, tokens_per_image)
            clean = logits if self.load_with_clip_bias else unbiased   # what the load estimate starts from
            noise_std = None
            if self.noisy_gating and self.training:
                noise_std = F.softplus(self._project(self.w_n, tokens, prompt, tokens_per_image)) + NOISE_FLOOR
                logits = logits + torch.randn_like(logits) * noise_std
            top_logits, top_ids = logits.topk(min(self.top_k + 1, self.num_experts), dim=1)
            expert_ids = top_ids[:, :self.top_k]
            gates = torch.softmax(top_logits[:, :self.top_k], dim=1)
            if noise_std is not None and self.top_k < self.num_experts:
                load = smooth_load(clean, logits, noise_std, top_logits, self.top_k)
            else:
                load = _count_per_expert(expert_ids, self.num_experts, weights=(gates > 0).to(gates.dtype))
            return Routing(expert_ids, gates, self._balance_loss(expert_ids, gates, load))

    def _balance_loss(self, expert_ids, gates, load):
        """cv^2(importance) + cv^2(load); importance = summed gates per expert over this rank's tokens."""
        importance = gates.new_zeros(self.num_experts).index_add(0, expert_ids.flatten(), gates.flatten())
        return cv_squared(importance) + cv_squared(load)


class _VariableAllToAll(torch.autograd.Function):
    """all_to_all_single with per-rank row counts; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, rows, send_counts: List[int], recv_counts: List[int], group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return _all_to_all_rows(rows, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad_rows):
        send_counts, recv_counts = ctx.counts
        return _all_to_all_rows(grad_rows, recv_counts, send_counts, ctx.group), None, None, None


def _all_to_all_rows(rows, send_counts, recv_counts, group):
    received = rows.new_empty((sum(recv_counts),) + tuple(rows.shape[1:]))
    torch_dist.all_to_all_single(received, rows.contiguous(), recv_counts, send_counts, group=group)
    return received


class ExpertDispatch(nn.Module):
    """Runs rows sorted by global expert id through their experts, across the expert-parallel group.

    Held as `DDER.deepspeed_moe`, with DeepSpeed's `Experts` container as `.experts`: that is the key
    layout DeepSpeed's checkpointing expects. `ep_group` is set by `DDER.set_deepspeed_parallelism`.
    """

    def __init__(self, experts: Experts, ep_size: int):
        super().__init__()
        self.experts = experts
        self.ep_size = ep_size
        self.ep_group = None

    def _run_local_experts(self, rows, counts_per_local_expert: List[int]):
        # Every expert runs, even on zero rows, so each expert parameter always receives a gradient.
        chunks = rows.split(counts_per_local_expert)
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts.deepspeed_experts, chunks)])

    def forward(self, rows: torch.Tensor, counts_per_expert: torch.Tensor) -> torch.Tensor:
        """rows (N, C) grouped by global expert id, counts_per_expert (num_experts,) -> outputs (N, C)."""
        if self.ep_size == 1:
            return self._run_local_experts(rows, counts_per_expert.tolist())
        if self.ep_group is None:
            raise RuntimeError("DDER with ep_size > 1 has no expert-parallel group: deepspeed.initialize creates "
                               "it (for inference in one process, build the model with ep_size 1)")
        return self._exchange_and_run(rows, counts_per_expert)

    def _exchange_and_run(self, rows, counts_per_expert):
        num_local = self.experts.num_local_experts
        # Every rank calls both all-to-alls, whatever its counts (zero counts included).
        send_matrix = counts_per_expert.view(self.ep_size, num_local)
        recv_matrix = torch.empty_like(send_matrix)
        torch_dist.all_to_all_single(recv_matrix, send_matrix.contiguous(), group=self.ep_group)
        # The row splits are host lists: both matrices come over in one copy (a host sync), not one per list.
        send_on_host, recv_on_host = torch.stack([send_matrix, recv_matrix]).cpu()
        send_counts = send_on_host.sum(1).tolist()
        recv_counts = recv_on_host.sum(1).tolist()
        received = _VariableAllToAll.apply(rows, send_counts, recv_counts, self.ep_group)

        # Received rows come ordered (source rank, local expert); regroup them by local expert.
        local_ids = torch.arange(num_local, device=rows.device).repeat(self.ep_size)
        row_expert = local_ids.repeat_interleave(recv_matrix.flatten(), output_size=sum(recv_counts))
        by_expert = torch.argsort(row_expert, stable=True)
        outputs = self._run_local_experts(received[by_expert], recv_on_host.sum(0).tolist())
        outputs = torch.empty_like(outputs).index_copy(0, by_expert, outputs)
        return _VariableAllToAll.apply(outputs, recv_counts, send_counts, self.ep_group)


@dataclass
class Assignments:
    token_ids: torch.Tensor          # (N,) token of each kept (token, expert) assignment, grouped by expert
    gates: torch.Tensor              # (N,) its gate
    counts_per_expert: torch.Tensor  # (num_experts,) kept assignments per expert


def sort_assignments(routing: Routing, num_experts: int, capacity: Optional[int]) -> Assignments:
    """Flatten the top-k choices, drop zero gates (as official), group by expert, apply the capacity.

    With a capacity, each expert keeps its first `capacity` assignments in token order; later ones are
    dropped and contribute nothing to their token's output (the residual still carries the token).
    """
    num_tokens, k = routing.expert_ids.shape
    expert_ids = routing.expert_ids.flatten()
    gates = routing.gates.flatten()
    token_ids = torch.arange(num_tokens, device=expert_ids.device).repeat_interleave(k)
    # Each selection by index, found once: a boolean mask finds them anew for every tensor it indexes, and
    # again in the backward, a host synchronisation each time on a GPU.
    kept = torch.nonzero(gates > 0).squeeze(1)
    expert_ids, gates, token_ids = expert_ids[kept], gates[kept], token_ids[kept]

    order = torch.argsort(expert_ids, stable=True)
    expert_ids, gates, token_ids = expert_ids[order], gates[order], token_ids[order]
    counts = _count_ids(expert_ids, num_experts)
    if capacity is not None:
        first_of_expert = torch.cumsum(counts, 0) - counts
        position = torch.arange(expert_ids.numel(), device=expert_ids.device) - first_of_expert[expert_ids]
        kept = torch.nonzero(position < capacity).squeeze(1)
        expert_ids, gates, token_ids = expert_ids[kept], gates[kept], token_ids[kept]
        counts = counts.clamp(max=capacity)   # an expert keeps its first `capacity` assignments
    return Assignments(token_ids, gates, counts)


def _count_ids(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bincount(expert_ids, minlength=num_experts) (int64), without reading the largest id on the host."""
    return expert_ids.new_zeros(num_experts).index_add_(0, expert_ids, torch.ones_like(expert_ids))


def dropped_assignments(routing: Routing, num_experts: int, capacity: Optional[int]) -> torch.Tensor:
    """How many of the routing's assignments the capacity drops, as a float scalar (0 without a capacity).

    Both dispatches keep, per expert, its first `capacity` assignments with a nonzero gate (`sort_assignments`,
    `dense_gate_matrix`): an expert chosen n times drops max(0, n - capacity). Counted from the per-expert
    totals, so its shapes do not depend on the data (it compiles) and it needs no host synchronisation.
    """
    if capacity is None:
        return routing.gates.new_zeros((), dtype=torch.float32)
    ids, gates = routing.expert_ids.detach(), routing.gates.detach()
    chosen = _count_per_expert(ids, num_experts, weights=(gates > 0).to(torch.float32))
    return (chosen - capacity).clamp(min=0).sum()


def _finish_combine(total: torch.Tensor, mode: str, routed: torch.Tensor) -> torch.Tensor:
    """The gated sum as is ("linear"), or its log with exact zeros replaced by eps ("log", official).

    `routed` (num_tokens,) marks the tokens with a kept assignment; the others (all their choices dropped by
    the capacity) get 0 in both modes, so only their residual is left: log mode's log(eps) = -36 there would
    shift a quarter of the tokens by -36 at capacity 1, and their gradients overflow a few layers on."""
    if mode == "linear":
        return total
    logged = torch.where(total == 0, torch.full_like(total, LOG_COMBINE_EPS), total).log()
    return torch.where(routed.unsqueeze(1), logged, torch.zeros_like(logged))


def combine_expert_outputs(outputs, gates, token_ids, num_tokens: int, mode: str) -> torch.Tensor:
    """Mix each token's expert outputs by its gates, in fp32 or better -> (num_tokens, C).

    "log" (official): log(sum_i g_i * exp(E_i(x))), with exact zeros replaced by eps before the log.
    "linear": sum_i g_i * E_i(x). Tokens with no kept assignment get 0 in both modes (only the residual is left).
    """
    outputs = _at_least_fp32(outputs)
    terms = outputs.exp() if mode == "log" else outputs
    weighted = gates.unsqueeze(1) * terms
    total = weighted.new_zeros(num_tokens, outputs.shape[1]).index_add(0, token_ids, weighted)
    routed = torch.zeros(num_tokens, dtype=torch.bool, device=total.device).index_fill(0, token_ids, True)
    return _finish_combine(total, mode, routed)


def dense_gate_matrix(routing: Routing, num_experts: int, capacity: Optional[int]) -> torch.Tensor:
    """(S, num_experts) gates, zero for experts a token does not use: `sort_assignments` without sorting.

    With a capacity, an assignment is kept when fewer than `capacity` earlier tokens (zero gates
    excluded) chose the same expert, the same first-come rule as the sparse path.
    """
    gates = routing.gates.new_zeros(routing.gates.shape[0], num_experts)
    gates = gates.scatter(1, routing.expert_ids, routing.gates)
    if capacity is None:
        return gates
    chosen = gates > 0
    position = chosen.cumsum(0) - 1
    return torch.where(chosen & (position < capacity), gates, torch.zeros_like(gates))


def run_experts_densely(experts: List[ExpertMLP], tokens: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, (S, C) -> (S, E, C): one GEMM for all first layers, one batched
    GEMM for the second ones. Same arithmetic as calling each `ExpertMLP` on the tokens (biases are
    added inside the GEMMs, so under bf16 each output is rounded once, as nn.Linear does)."""
    num_experts = len(experts)
    hidden = F.linear(tokens, torch.cat([e.fc1.weight for e in experts]), torch.cat([e.fc1.bias for e in experts]))
    hidden = experts[0].act(hidden).unflatten(1, (num_experts, -1)).transpose(0, 1)           # (E, S, H)
    second = torch.stack([e.fc2.weight for e in experts]).transpose(1, 2)                    # (E, H, C)
    bias = torch.stack([e.fc2.bias for e in experts]).unsqueeze(1)                           # (E, 1, C)
    outputs = torch.baddbmm(bias.to(hidden.dtype), hidden, second.to(hidden.dtype))          # (E, S, C)
    return outputs.transpose(0, 1)


def combine_dense_outputs(outputs, gates, mode: str) -> torch.Tensor:
    """`combine_expert_outputs` for (S, E, C) outputs and (S, E) gates, in fp32 or better -> (S, C).

    Unused experts' outputs are zeroed before the exp, so neither an overflow there nor its gradient
    can turn a zero gate into NaN: the result equals the sparse path's, which never computes them.
    """
    outputs = _at_least_fp32(outputs)
    used = (gates > 0).unsqueeze(2)
    terms = torch.where(used, outputs, torch.zeros_like(outputs))
    if mode == "log":
        terms = terms.exp()
    total = (gates.unsqueeze(2) * terms).sum(1)
    return _finish_combine(total, mode, used.any(1).squeeze(1))


def capacity_per_expert(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> Optional[int]:
    """ceil(factor * S * k / E) assignments per expert; None (no cap) when the factor is 0."""
    if capacity_factor == 0:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def _validate(cfg) -> None:
    if cfg.ep_size < 1 or cfg.num_experts % cfg.ep_size != 0:
        raise ValueError(f"model.moe.ep_size={cfg.ep_size} must divide model.moe.num_experts={cfg.num_experts}")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(f"model.moe.top_k={cfg.top_k} must be in [1, model.moe.num_experts={cfg.num_experts}]")
    if cfg.combine not in COMBINE_MODES:
        raise ValueError(f"model.moe.combine={cfg.combine!r} must be one of {COMBINE_MODES}")
    for key in ("capacity_factor", "eval_capacity_factor"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"model.moe.{key}={getattr(cfg, key)} must be >= 0 (0 = no token dropped)")
    if cfg.dispatch not in DISPATCH_MODES:
        raise ValueError(f"model.moe.dispatch={cfg.dispatch!r} must be one of {DISPATCH_MODES}")
    if cfg.dispatch == "dense" and cfg.ep_size > 1:
        raise ValueError(f"model.moe.dispatch='dense' needs ep_size 1, got model.moe.ep_size={cfg.ep_size}: "
                         "expert parallelism exchanges tokens sparsely ('auto' picks that)")


def resolve_dispatch(cfg) -> str:
    """model.moe.dispatch with "auto" decided (dense without expert parallelism); announced once."""
    if cfg.dispatch != "auto":
        return cfg.dispatch
    dispatch = "dense" if cfg.ep_size == 1 else "sparse"
    reason = "ep_size 1: static shapes, no host sync" if dispatch == "dense" else f"ep_size {cfg.ep_size}"
    announce_once(f"MoE dispatch: {dispatch} ({reason})")
    return dispatch


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel (and expert data-parallel) groups of this ep_size."""
    return f"ep_size_{ep_size}"


# DeepSpeed's default layout, the one supported (DDER.set_deepspeed_parallelism checks it): consecutive
# ranks form an expert-parallel group, ranks r, r + ep_size, r + 2 ep_size, ... hold the same experts.
def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """The index of global rank `rank` in its expert-parallel group: which expert shard it holds."""
    return rank % ep_size


def is_first_expert_replica(rank: int, ep_size: int) -> bool:
    """Whether `rank` is the first of the ranks holding its expert shard (the one that saves it)."""
    return rank < ep_size


def _expert_parallel_rank(ep_size: int) -> int:
    """This process's index in its expert-parallel group (`expert_parallel_rank`)."""
    if ep_size == 1:
        return 0
    if not dist.is_initialized():
        raise RuntimeError(f"model.moe.ep_size={ep_size} needs torch.distributed initialised before the model is "
                           "built (deepspeed.init_distributed())")
    if dist.world_size() % ep_size != 0:
        raise ValueError(f"model.moe.ep_size={ep_size} must divide the world size {dist.world_size()}")
    return expert_parallel_rank(dist.rank(), ep_size)


class DDER(MoE):
    """One DDER adapter, per pixel token: x + the gated mix of its top-k experts' outputs on x.

    Subclasses DeepSpeed's `MoE` only so that DeepSpeed's engine recognises it (param groups, expert
    gradient reduction, per-expert checkpoint files); `MoE.__init__` is deliberately not called because it
    builds DeepSpeed's own gate and dispatcher, which this layer replaces. The attributes the engine reads
    (`num_experts`, `ep_size`, `num_local_experts`, `expert_group_name`, `set_deepspeed_parallelism`) are
    provided here.

    Experts are initialised from (seed, layer_id, global expert id), so expert g has the same weights
    whatever ep_size is; the prompt projection and router draw from the ambient torch RNG.
    """

    recompute_in_backward = False   # set by M2Restore.set_activation_checkpointing

    def __init__(self, dim: int, prompt_dim: int, num_prompts: int, cfg, layer_id: int, seed: int):
        nn.Module.__init__(self)
        _validate(cfg)
        self.num_experts = cfg.num_experts
        self.ep_size = cfg.ep_size
        self.num_local_experts = cfg.num_experts // cfg.ep_size
        self.expert_group_name = expert_group_name(cfg.ep_size)
        self.ep_rank = _expert_parallel_rank(cfg.ep_size)
        self.top_k = cfg.top_k
        self.combine = cfg.combine
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.dispatch = resolve_dispatch(cfg)

        self.prompt_proj = nn.Linear(prompt_dim, dim)
        self.router = Router(dim, num_prompts, cfg.num_experts, cfg.top_k, cfg.noisy_gating, cfg.clip_bias_init,
                             cfg.load_with_clip_bias)
        prototype = ExpertMLP(dim, int(cfg.expert_hidden_factor * dim))
        experts = Experts(prototype, self.num_local_experts, self.expert_group_name)
        for local_id, expert in enumerate(experts.deepspeed_experts):
            init_expert_(expert, seed, layer_id, self.first_global_expert_id + local_id)
        self.deepspeed_moe = ExpertDispatch(experts, cfg.ep_size)

    @property
    def first_global_expert_id(self) -> int:
        return self.ep_rank * self.num_local_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create (once) DeepSpeed's expert and expert-data groups and attach the expert-parallel one.

        deepspeed.initialize calls this on every module that has it.
        """
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        group_rank = groups._get_expert_parallel_rank(self.expert_group_name)
        if group_rank != self.ep_rank:
            raise RuntimeError(f"expert-parallel rank {group_rank} differs from the rank {self.ep_rank} the experts "
                               "were initialised for: only DeepSpeed's default layout (consecutive ranks share "
                               "experts, use_data_before_expert_parallel=False) is supported")
        self.deepspeed_moe.ep_group = groups._get_expert_parallel_group(self.expert_group_name)

    def forward(self, x, task_prompt, clip_probs):
        """x (B,C,H,W), task_prompt (B,prompt_dim), clip_probs (B,num_prompts)
        -> (x + MoE(x), balance loss scalar, expert_load (num_experts,) detached assignment fractions,
        dropped: fp32 scalar, the fraction of the top-k assignments the capacity dropped (0 without one))."""
        batch, dim, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(-1, dim)
        routing = self.router(tokens, self.prompt_proj(task_prompt), clip_probs, height * width)

        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = capacity_per_expert(factor, tokens.shape[0], self.top_k, self.num_experts)
        mix = self._mix_densely if self.dispatch == "dense" else self._mix_sparsely
        if self.recompute_in_backward and torch.is_grad_enabled():
            # Only the experts, which hold the adapter's activations, are recomputed. The router's
            # top-k stays out: torch.compile's partitioner fails on a recomputed top-k routing (torch
            # 2.14: "Node ... was invalid, but is output"), and its few values per token are cheap to keep.
            mixed = checkpoint(mix, tokens, routing, capacity, use_reentrant=False)
        else:
            mixed = mix(tokens, routing, capacity)
        mixed = mixed.to(x.dtype).view(batch, height, width, dim).permute(0, 3, 1, 2)
        return x + mixed, routing.balance_loss, self._expert_load(routing), self._dropped(routing, capacity)

    def _mix_densely(self, tokens, routing: Routing, capacity: Optional[int]) -> torch.Tensor:
        gates = dense_gate_matrix(routing, self.num_experts, capacity)
        experts = list(self.deepspeed_moe.experts.deepspeed_experts)
        rows = max(1, MAX_GEMM_ELEMENTS // (self.num_experts * experts[0].fc1.out_features))
        mixed = [combine_dense_outputs(run_experts_densely(experts, chunk), chunk_gates, self.combine)
                 for chunk, chunk_gates in zip(tokens.split(rows), gates.split(rows))]
        return mixed[0] if len(mixed) == 1 else torch.cat(mixed)

    # Data-dependent sizes (a host sync per layer): kept out of torch.compile's graphs as one eager island.
    @torch.compiler.disable
    def _mix_sparsely(self, tokens, routing: Routing, capacity: Optional[int]) -> torch.Tensor:
        assignments = sort_assignments(routing, self.num_experts, capacity)
        outputs = self.deepspeed_moe(tokens[assignments.token_ids], assignments.counts_per_expert)
        return combine_expert_outputs(outputs, assignments.gates, assignments.token_ids, tokens.shape[0],
                                      self.combine)

    def _expert_load(self, routing: Routing) -> torch.Tensor:
        """Fraction of this rank's top-k assignments that chose each expert (before any capacity drop)."""
        ids = routing.expert_ids.detach()
        return _count_per_expert(ids, self.num_experts) / ids.numel()

    def _dropped(self, routing: Routing, capacity: Optional[int]) -> torch.Tensor:
        """Fraction of this rank's top-k assignments that the capacity dropped (the denominator of
        `_expert_load`: assignments whose gate underflowed to 0 count, as kept by neither)."""
        return dropped_assignments(routing, self.num_experts, capacity) / routing.expert_ids.numel()
