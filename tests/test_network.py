"""The M2Restore network: faithful size, shapes, determinism, gradients, switches, AFLB arithmetic."""
import math

import pytest
import torch

from m2r.config import load_config
from m2r.models.aflb import (AFLB, axis_filter, official_box_mask, official_box_split_by_fft, soft_axis_mask,
                             soft_box_split)
from m2r.models.bottleneck import MB, from_scan_order, to_scan_order
from m2r.models import summary
from m2r.models.config import ModelConfig
from m2r.models.m2restore import build_model
from m2r.models.restormer import ChannelLayerNorm, DepthwiseConv3x3

OFFICIAL_TRAINABLE_PARAMS = 46_830_041
OFFICIAL_UNUSED_AFLB_PARAMS = 43_098
PLUS_EXTRA_PARAMS = 3 * 6   # the 7th prompt adds one input to each DDER's 6-expert CLIP bias


def model_config(name, *overrides):
    return load_config(ModelConfig, f"configs/model/{name}.yaml", list(overrides))


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def meta_model(name, *overrides):
    with torch.device("meta"):
        return build_model(model_config(name, *overrides), with_clip_prior=False)


@pytest.fixture(scope="module")
def tiny():
    return build_model(model_config("tiny"))


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_faithful_config_has_the_official_parameter_count():
    model = meta_model("m2restore")
    assert parameter_count(model) == OFFICIAL_TRAINABLE_PARAMS
    unused = set(model.unused_parameter_names())
    assert sum(p.numel() for n, p in model.named_parameters() if n in unused) == OFFICIAL_UNUSED_AFLB_PARAMS
    assert len(model.bottleneck) == 8 and all(isinstance(block, MB) for block in model.bottleneck)


def test_summary_tool_prints_module_counts_and_ends_with_the_trainable_total(capsys):
    summary.main(["--config", "configs/model/m2restore.yaml"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"trainable_params: {OFFICIAL_TRAINABLE_PARAMS}"
    assert any(line.split()[:2] == ["bottleneck", "30,713,432"] for line in lines)
    assert any("246,213,634" in line for line in lines)  # frozen DA-CLIP ViT-B/32, counted apart


@pytest.mark.parametrize("config, trainable", [("configs/pretrain/m2restore-xl.yaml", 63_998_291),
                                               ("configs/finetune/allweather-plus.yaml",
                                                OFFICIAL_TRAINABLE_PARAMS + PLUS_EXTRA_PARAMS)])
def test_summary_tool_counts_the_network_of_a_training_config(config, trainable, capsys):
    """The xl recipe widens its experts in the pretrain config itself, not in a model config."""
    summary.main(["--config", config, "model.moe.top_k=2"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trainable_params: {trainable}"


@pytest.mark.parametrize("sections", ["data:\n  source: builtin\n",                       # pretrain, no train:
                                      "data:\n  dataset: cdd11\n  root: /data/CDD-11\n",   # finetune, no train:
                                      "init:\n  weights: null\n"])
def test_summary_tool_reads_a_training_config_without_a_train_section(sections, tmp_path, capsys):
    """README: `_base_: [m2r:model/...@model]` in a config of your own; `train:` may be left at its defaults."""
    config = tmp_path / "mine.yaml"
    config.write_text("_base_: [m2r:model/tiny.yaml@model]\n" + sections)
    summary.main(["--config", str(config)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "trainable_params: 470354"


def test_plus_config_differs_only_by_the_seventh_prompt():
    model = meta_model("m2restore-plus")
    assert parameter_count(model) == OFFICIAL_TRAINABLE_PARAMS + PLUS_EXTRA_PARAMS
    assert model.input_range == "zero_one" and model.aflb1.mask_rule == "fixed"
    assert model.bottleneck[0].ssm.scan_orders == ("row", "row_reversed")


def test_tiny_config_is_small_but_has_every_part(tiny):
    assert parameter_count(tiny) < 1_000_000
    names = dict(tiny.named_children())
    assert {"dder1", "dder2", "dder3", "aflb1", "aflb2", "aflb3", "bottleneck"} <= set(names)
    assert all(isinstance(block, MB) for block in tiny.bottleneck)


def test_clip_prior_is_frozen_and_outside_parameters_and_state_dict(tiny):
    clip_params = {id(p) for p in tiny.clip_prior.parameters()}
    assert clip_params and not clip_params & {id(p) for p in tiny.parameters()}
    assert not any("clip" in key for key in tiny.state_dict())
    assert not any(p.requires_grad for p in tiny.clip_prior.parameters())


def test_dtype_and_device_moves_reach_the_clip_prior():
    model = build_model(model_config("tiny")).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.clip_prior.parameters())
    assert not any(p.requires_grad for p in model.clip_prior.parameters())
    model.train()
    assert not model.clip_prior.training


@pytest.mark.parametrize("height, width", [(16, 16), (24, 40), (48, 32)])
def test_forward_shapes(tiny, height, width):
    tiny.eval()
    with torch.no_grad():
        out = tiny(images(2, 3, height, width))
    assert out.restored.shape == (2, 3, height, width)
    assert out.balance_loss.dim() == 0 and torch.isfinite(out.balance_loss)
    assert len(out.expert_load) == 3
    for load in out.expert_load:
        assert load.shape == (4,) and not load.requires_grad
        assert load.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("height, width", [(20, 32), (32, 36), (8, 8)])
def test_unsupported_sizes_are_refused_with_the_size(tiny, height, width):
    with pytest.raises(ValueError, match=f"{height}x{width}"):
        tiny(images(1, 3, height, width))


def test_eval_forward_is_deterministic(tiny):
    tiny.eval()
    lq = images(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny(lq).restored, tiny(lq).restored)


def test_same_seed_same_weights_other_seed_other_weights():
    first = build_model(model_config("tiny")).state_dict()
    again = build_model(model_config("tiny")).state_dict()
    other = build_model(model_config("tiny", "seed=1")).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["bottleneck.0.ssm.gate_net.0.weight"],
                           other["bottleneck.0.ssm.gate_net.0.weight"])


def training_step_grads(model, lq, seed=0):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the noisy router draws from the global generator
    out = model(lq)
    (out.restored.abs().mean() + 0.01 * out.balance_loss).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_backward_reaches_every_parameter_except_the_unused_aflb_layers(tiny):
    grads = training_step_grads(tiny, images(2, 3, 16, 24))
    unused = set(tiny.unused_parameter_names())
    assert unused == {n for n in grads if n.startswith("aflb")
                      and n.split(".")[1] in ("conv", "score_gen", "rate_conv")}
    assert all(grads[name] is None for name in unused)
    assert all(grads[name] is not None and torch.isfinite(grads[name]).all()
               for name in grads if name not in unused)


# Runs of (bottleneck[0], dder1, encoder_level1[0], decoder_level1[0], refinement[0], dder2, encoder_level2[0])
# in one training step: once in forward, once more in backward if recomputed. A DDER runs once: it
# recomputes its experts inside, not its router (test_engine_units.py).
@pytest.mark.parametrize("mode, runs", [
    ("all", (2, 1, 2, 2, 2, 1, 2)),
    ("levels_1_2", (1, 1, 2, 2, 2, 1, 2)),
    ("full_res", (1, 1, 2, 2, 2, 1, 1)),
    ("bottleneck", (2, 1, 1, 1, 1, 1, 1)),
    ("none", (1, 1, 1, 1, 1, 1, 1)),
])
def test_activation_checkpointing_recomputes_and_gives_the_same_grads(mode, runs):
    model = build_model(model_config("tiny")).double()
    lq = images(1, 3, 16, 24).double()
    reference = training_step_grads(model, lq)

    watched = [model.bottleneck[0], model.dder1, model.encoder_level1[0], model.decoder_level1[0],
               model.refinement[0], model.dder2, model.encoder_level2[0]]
    calls = []
    for index, module in enumerate(watched):
        module.register_forward_pre_hook(lambda *_, index=index: calls.append(index))
    model.set_activation_checkpointing(mode)
    checkpointed = training_step_grads(model, lq)
    assert tuple(calls.count(index) for index in range(len(watched))) == runs
    for name, grad in reference.items():
        if grad is None:
            assert checkpointed[name] is None, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="everything"):
        model.set_activation_checkpointing("everything")


@pytest.mark.parametrize("input_range, network_input", [
    ("minus_one_one", lambda lq: 2 * lq - 1),
    ("zero_one", lambda lq: lq),
])
def test_input_range_sets_what_the_network_sees_and_adds_back(input_range, network_input):
    model = build_model(model_config("tiny", f"input_range={input_range}")).eval()
    torch.nn.init.zeros_(model.output.weight)  # the head then contributes nothing
    lq = images(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(lq).restored, network_input(lq))


@pytest.mark.parametrize("scan", ["bidirectional", "four_way"])
def test_multi_direction_scans_share_the_raster_weights(tiny, scan):
    model = build_model(model_config("tiny", f"mamba.scan={scan}"))
    assert model.state_dict().keys() == tiny.state_dict().keys()
    out = model(images(1, 3, 16, 24))
    out.restored.mean().backward()
    assert torch.isfinite(model.bottleneck[0].ssm.mamba.in_proj.weight.grad).all()


@pytest.mark.parametrize("order", ["row", "row_reversed", "column", "column_reversed"])
def test_scan_orders_are_inverted_exactly(order):
    grid = torch.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4)
    sequence = to_scan_order(grid, order)
    assert torch.equal(from_scan_order(sequence, order, 3, 5), grid)
    first_token = {"row": (0, 0), "row_reversed": (2, 4), "column": (0, 0), "column_reversed": (2, 4)}
    second_token = {"row": (0, 1), "row_reversed": (2, 3), "column": (1, 0), "column_reversed": (1, 4)}
    assert torch.equal(sequence[:, 0], grid[:, first_token[order][0], first_token[order][1]])
    assert torch.equal(sequence[:, 1], grid[:, second_token[order][0], second_token[order][1]])


def test_plus_switches_run_and_the_fixed_mask_trains_rate_conv():
    cfg = model_config("tiny", "aflb_mask=fixed", "input_range=zero_one", "moe.combine=linear",
                       "mamba.scan=bidirectional", "clip.normalize=true", "clip.cache_text_features=true",
                       "clip.prompts=[hazy,noisy,raindrop,rainy,shadowed,snowy,low-light]")
    model = build_model(cfg)
    grads = training_step_grads(model, images(2, 3, 32, 32))
    assert all(name.split(".")[1] in ("conv", "score_gen") for name in model.unused_parameter_names())
    # para1 starts at 0, so rate_conv's first gradient is zero, but it exists (the mask is soft).
    assert grads["aflb1.rate_conv.0.weight"] is not None


def test_mamba_may_follow_bf16_autocast_with_finite_gradients():
    block = MB(16, 8, 2.66, False, d_state=4, follow_autocast=True)
    x, clip_embed = images(2, 16, 8, 8).requires_grad_(True), images(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = block.ssm.mamba.in_proj(torch.ones(1, 16))
        out = block(x, clip_embed)
    assert inside.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    block.ssm.follow_autocast = False        # the official recipe: the Mamba layer stays fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.ssm(x, clip_embed).dtype == torch.float32


def test_mamba_following_autocast_trains_with_deepspeeds_bf16_weights():
    """The engine's bf16 is bf16 weights without autocast, and the CLIP prompt comes in fp32: a Mamba layer set to
    follow autocast then computes what the official setting computes (model.mamba.autocast changes nothing there)."""
    block = MB(16, 8, 2.66, False, d_state=4, follow_autocast=True).to(torch.bfloat16)
    x, clip_embed = images(2, 16, 8, 8).to(torch.bfloat16), images(2, 8)
    following = block(x, clip_embed)
    block.ssm.follow_autocast = False
    assert following.dtype == torch.bfloat16 and torch.equal(following, block(x, clip_embed))


def test_channels_last_gives_the_same_result_with_channels_last_features():
    model = build_model(model_config("tiny")).double().eval()
    lq = images(2, 3, 32, 40).double()
    reference = model(lq).restored
    model.use_channels_last()
    seen = []
    model.encoder_level1[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
    restored = model(lq).restored
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(restored, reference, rtol=1e-10, atol=1e-12)


def test_compiled_training_forward_matches_eager_never_recompiles_and_evaluation_stays_eager():
    """aot_eager traces exactly what inductor compiles (forward and backward graphs, graph breaks at
    the eager islands) without generating code, which is too slow for this CPU suite."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = model_config("tiny", "moe.noisy_gating=false")
    eager, compiled = build_model(cfg), build_model(cfg)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile_training_forward(backend=counter)
    lq = images(2, 3, 32, 32)
    reference, ours = training_step_grads(eager, lq), training_step_grads(compiled, lq)
    assert counter.frame_count > 0       # training really ran the compiled forward
    for name, grad in reference.items():
        if grad is None:
            assert ours[name] is None, name
        else:
            torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Validation in between (eval mode, another size) and later steps reuse the compiled graphs.
    frames = counter.frame_count
    with torch.no_grad():
        compiled.eval()(images(1, 3, 24, 40))
    training_step_grads(compiled, images(2, 3, 32, 32, seed=1))
    assert counter.frame_count == frames

    calls = []
    compiled._compiled_forward = lambda lq: calls.append(lq)
    compiled.eval()(images(1, 3, 24, 40))
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_training_step_on_cuda():
    # cuFFT has no bf16 kernels: the AFLB must keep its FFT in fp32 under autocast.
    # 256 px: the AFLB at half resolution sees 128 px features, the smallest that take the FFT route
    # (below OFFICIAL_MASK_STEP the official box is empty and no transform runs).
    model = build_model(model_config("tiny")).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images(1, 3, 256, 256).cuda())
    (out.restored.float().abs().mean() + out.balance_loss).backward()
    assert torch.isfinite(out.restored).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp16_weights_train_the_official_network_without_nan():
    """DeepSpeed's fp16 keeps the weights in fp16. Below 128 px the official AFLB's low band is all zeros, and
    F.normalize's eps (1e-12) is 0 in fp16: its channel attention must not turn that into 0 / 0 = NaN."""
    model = build_model(model_config("tiny")).half().train()
    out = model(images(2, 3, 64, 64).half())
    (out.restored.float().abs().mean() + out.balance_loss.float()).backward()
    assert torch.isfinite(out.restored).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fp16_normalisation_leaves_fp32_and_bf16_attention_as_it_was(dtype):
    """Only fp16 rows go through fp32: the fp32 and bf16 runs (and their compiled graphs) are F.normalize's."""
    import torch.nn.functional as F
    from m2r.models.restormer import _unit_rows

    rows = torch.randn(2, 3, 8, 257, generator=torch.Generator().manual_seed(0)).to(dtype) * 37
    assert torch.equal(_unit_rows(rows), F.normalize(rows, dim=-1))


# DeepSpeed's fp16 starts at 2**16 and halves the loss scale on every overflow; the tiny net's task-prompt
# gradients (summed over every pixel) overflow at 2**16 itself, and fit from about 2**15 down.
FP16_LOSS_SCALE = 2.0 ** 10


def _fp16_step_gradients(model, image):
    """One fp16-weights step as DeepSpeed runs it: scaled loss, gradients in fp16."""
    out = model(image.half())
    loss = out.restored.float().abs().mean() + out.balance_loss.float()
    (loss * FP16_LOSS_SCALE).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides, image", [
    ((), images(1, 3, 64, 64)),                                                       # official empty low band
    (("input_range=zero_one", "aflb_mask=fixed"), torch.zeros(1, 3, 64, 64)),          # black image: both bands 0
])
def test_fp16_weights_give_finite_gradients_once_the_aflb_is_mixed_in(overrides, image):
    """para1 starts at 0, so at step 0 no gradient reaches the AFLB's attention. Once it has moved, an all-zero
    band row gets F.normalize's gradient 1 / eps = 1e12 times the incoming one: inf in fp16, then NaN weight
    gradients (inf * 0), so DeepSpeed would skip every step and stop at its minimum loss scale."""
    model = build_model(model_config("tiny", *overrides)).train()
    with torch.no_grad():
        for aflb in (model.aflb1, model.aflb2, model.aflb3):
            aflb.para1.fill_(0.1)
    grads = _fp16_step_gradients(model.half(), image)
    assert [name for name, grad in grads.items() if not torch.isfinite(grad).all()] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unit_rows_pass_no_gradient_into_zero_rows_in_fp16_and_match_f_normalize_otherwise(dtype):
    from m2r.models.restormer import _unit_rows

    rows = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(0))
    rows[0, 1, 2] = 0
    incoming = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    ours = rows.to(dtype).requires_grad_()
    _unit_rows(ours).backward(incoming.to(dtype))
    if dtype == torch.float16:   # normalised in fp32: compare with that, and no 1e12 gradient (inf) into the zero row
        reference = rows.to(dtype).float().requires_grad_()
        expected = torch.nn.functional.normalize(reference, dim=-1)
        expected.backward(incoming.to(dtype).float())
        assert torch.equal(_unit_rows(rows.to(dtype)), expected.to(dtype))
        assert torch.isfinite(ours.grad).all() and not ours.grad[0, 1, 2].any()
        keep = torch.ones(rows.shape[:-1], dtype=torch.bool)
        keep[0, 1, 2] = False
        assert torch.equal(ours.grad[keep], reference.grad.to(dtype)[keep])
    else:                        # exactly F.normalize, forward and backward
        reference = rows.to(dtype).requires_grad_()
        expected = torch.nn.functional.normalize(reference, dim=-1)
        expected.backward(incoming.to(dtype))
        assert torch.equal(_unit_rows(rows.to(dtype)), expected.detach())
        assert torch.equal(ours.grad, reference.grad)


# ---------------------------------------------------------------- reference checks on small pieces

def test_channel_layer_norm_is_layer_norm_over_channels():
    norm = ChannelLayerNorm(6)
    torch.nn.init.normal_(norm.body.weight)
    torch.nn.init.normal_(norm.body.bias)
    x = images(2, 6, 3, 5)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.body.weight,
                                              norm.body.bias, eps=1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)


def test_official_mask_is_the_truncated_h_over_128_box():
    rates = torch.tensor([[0.9, 0.3], [0.2, 0.99]])
    mask = official_box_mask(rates, 512, 384)
    # sample 0: half-sizes int(4 * 0.9) = 3 rows, int(3 * 0.3) = 0 cols -> empty
    assert mask[0].sum() == 0
    # sample 1: int(4 * 0.2) = 0 rows -> empty; the box needs h, w >= 256 and large rates
    assert mask[1].sum() == 0
    box = official_box_mask(torch.tensor([[0.5, 0.99]]), 512, 384)[0, 0]
    rows, cols = box.nonzero(as_tuple=True)
    assert rows.unique().tolist() == [254, 255, 256, 257]       # 256 -/+ int(4 * 0.5) = 2
    assert cols.unique().tolist() == [190, 191, 192, 193]       # 192 -/+ int(3 * 0.99) = 2
    assert box.sum() == 16


def soft_box_mask(rates, h, w):
    return soft_axis_mask(rates[:, 0], h)[:, None, :, None] * soft_axis_mask(rates[:, 1], w)[:, None, None, :]


def test_below_128_pixels_the_official_split_is_all_high_frequency_without_a_transform(monkeypatch):
    aflb = AFLB(16, num_heads=2, bias=False, mask="official")
    image = images(2, 3, 24, 200)
    x = aflb.conv1(image)
    by_fft = official_box_split_by_fft(x, aflb.box_rates(x))

    def no_transform(*args, **kwargs):
        raise AssertionError("the empty official box needs no FFT")

    monkeypatch.setattr(torch.fft, "fft2", no_transform)
    high, low = aflb.split_frequencies(image)
    assert torch.equal(low, torch.zeros_like(low)) and torch.equal(by_fft[1], low)
    assert torch.equal(high, by_fft[0]) and torch.equal(high, x.abs())
    grad_ours, = torch.autograd.grad(high.sum(), aflb.conv1.weight)
    grad_fft, = torch.autograd.grad(by_fft[0].sum(), aflb.conv1.weight)
    assert torch.equal(grad_ours, grad_fft)


def test_from_128_pixels_the_official_box_can_hold_frequencies():
    """int(1 * t) is 1 when the rate saturates to 1.0 (fp32's sigmoid does so from a logit of about 17)."""
    aflb = AFLB(8, num_heads=2, bias=False, mask="official")
    aflb.box_rates = lambda x: torch.ones(x.shape[0], 2)
    image = images(1, 3, 130, 200)
    high, low = aflb.split_frequencies(image)
    ref_high, ref_low, mask = centred_split_reference(aflb, image)
    assert mask.sum() == 4 and low.abs().amax() > 1e-3
    torch.testing.assert_close(high, ref_high, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_rates_below_one_stay_below_one_in_half_precision(dtype):
    """A logit of 9 is a rate of 0.99988 (fp16 and bf16 round it to 1.0): at 1.0 int(1 * t) would open the
    official box at 128 px, where the fp32 network keeps it empty."""
    class LogitsOfNine(torch.nn.Module):
        def forward(self, pooled):
            return torch.full((pooled.shape[0], 2, 1, 1), 9.0, dtype=pooled.dtype)

    aflb = AFLB(16, num_heads=2, bias=False, mask="official").to(dtype)
    aflb.rate_conv = LogitsOfNine()
    assert torch.sigmoid(torch.tensor(9.0, dtype=dtype)) == 1   # what the rates were before
    rates = aflb.box_rates(torch.ones(1, 16, 8, 8, dtype=dtype))
    assert rates.dtype == torch.float32 and (rates < 1).all()


def test_compiled_official_box_leaves_rate_conv_without_gradients_and_hooks_unfired():
    """Eagerly the truncated box gives `rate_conv` no gradient. Compiled, it must stay so: a zero gradient
    would let weight decay move it, and a None one still fires the post-accumulate hooks ZeRO-2 uses."""
    from torch._dynamo.testing import CompileCounterWithBackend

    grads = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        aflb = AFLB(16, num_heads=2, bias=False, mask="official")
        fired = []
        for name, param in aflb.named_parameters():
            param.register_post_accumulate_grad_hook(lambda _p, name=name: fired.append(name))
        counter = CompileCounterWithBackend("aot_eager")
        run = torch.compile(aflb, backend=counter, dynamic=False) if compiled else aflb
        run(images(1, 3, 128, 128), images(1, 16, 128, 128, seed=1)).square().sum().backward()
        assert (counter.frame_count > 0) == compiled
        assert not any(name.startswith("rate_conv") for name in fired)
        grads[compiled] = {name: param.grad for name, param in aflb.named_parameters()}
    for name, eager_grad in grads[False].items():
        if eager_grad is None:
            assert grads[True][name] is None, name
        else:
            torch.testing.assert_close(grads[True][name], eager_grad, rtol=1e-4, atol=1e-6, msg=name)
    assert grads[True]["rate_conv.0.weight"] is None


@pytest.mark.parametrize("n", [7, 8, 28, 45])
def test_axis_filter_is_the_masked_inverse_dft_along_one_axis(n):
    mask = soft_axis_mask(torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64), n)
    signal = torch.randn(3, n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    centred_mask = torch.roll(mask, shifts=-(n // 2), dims=1)
    by_dft = torch.fft.ifft(torch.fft.fft(signal, dim=1) * centred_mask[..., None], dim=1)
    assert by_dft.imag.abs().amax() < 1e-12       # a symmetric mask keeps a real signal real
    torch.testing.assert_close(axis_filter(mask) @ signal, by_dft.real, rtol=0, atol=1e-12)


def test_soft_split_runs_in_fp32_under_autocast_and_matches_float64():
    x = images(2, 4, 28, 36) - 0.5
    rates = torch.tensor([[0.2, 0.7], [0.9, 0.05]])
    reference = soft_box_split(x.double(), rates.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = soft_box_split(x.bfloat16(), rates.bfloat16())
    assert all(band.dtype == torch.float32 for band in ours)
    for band, ref in zip(ours, reference):
        torch.testing.assert_close(band.double(), ref, rtol=0, atol=2e-2)   # bf16 input rounding only


@pytest.mark.parametrize("mask_rule, depthwise", [("official", "conv"), ("fixed", "conv"), ("official", "shifted")])
def test_training_forward_has_no_graph_break_below_the_official_box_size(mask_rule, depthwise):
    """At training crops up to 255 px neither mask needs complex numbers: torch.compile sees one
    graph, which inductor can fuse whole (under bf16 autocast, as the benchmark trains)."""
    model = build_model(model_config("tiny", f"aflb_mask={mask_rule}", f"depthwise={depthwise}")).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model._forward)(images(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def centred_split_reference(aflb, image):
    """The official formulation: centre the spectrum, mask it twice, un-centre and invert both parts."""
    x = aflb.conv1(image)
    h, w = x.shape[-2:]
    mask = (official_box_mask if aflb.mask_rule == "official" else soft_box_mask)(aflb.box_rates(x), h, w)
    centred = torch.roll(torch.fft.fft2(x, norm="forward"), shifts=(h // 2, w // 2), dims=(2, 3))

    def invert(part):
        return torch.fft.ifft2(torch.roll(part, shifts=(-(h // 2), -(w // 2)), dims=(2, 3)), norm="forward").abs()

    return invert(centred * (1 - mask)), invert(centred * mask), mask


@pytest.mark.parametrize("mask_rule", ["official", "fixed"])
def test_frequency_split_equals_the_official_centred_formulation(mask_rule):
    torch.manual_seed(0)
    aflb = AFLB(8, num_heads=2, bias=False, mask=mask_rule)
    torch.nn.init.normal_(aflb.rate_conv[2].weight, std=20.0)   # rates far from 0.5: a non-empty official box
    image = images(2, 3, 256, 256)
    high, low = aflb.split_frequencies(image)
    (high.sum() + (low * low).sum()).backward()
    ours = [p.grad.clone() for p in (aflb.conv1.weight, *aflb.rate_conv.parameters()) if p.grad is not None]
    aflb.zero_grad()

    ref_high, ref_low, mask = centred_split_reference(aflb, image)
    assert mask.sum() > 0 and low.abs().amax() > 1e-3
    torch.testing.assert_close(high, ref_high, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-4)
    (ref_high.sum() + (ref_low * ref_low).sum()).backward()
    refs = [p.grad for p in (aflb.conv1.weight, *aflb.rate_conv.parameters()) if p.grad is not None]
    assert len(ours) == len(refs) == (1 if mask_rule == "official" else 3)
    for our_grad, ref_grad in zip(ours, refs):
        torch.testing.assert_close(our_grad, ref_grad, atol=1e-4, rtol=1e-3)


def test_fixed_mask_keeps_dc_and_grows_with_the_rate():
    mask = soft_box_mask(torch.tensor([[0.0, 0.0], [1.0, 0.5]]), 16, 8)
    dc_only = torch.zeros(16, 8)
    dc_only[8, 4] = 1
    assert torch.equal(mask[0, 0], dc_only)
    # rate 1 on 16 rows: radius 4 -> rows 4..12 fully in; rate 0.5 on 8 cols: radius 1 -> cols 3..5
    expected = torch.zeros(16, 8)
    expected[4:13, 3:6] = 1
    assert torch.equal(mask[1, 0], expected)
    # rate 0.125 on 16 rows: radius 0.5 -> DC row 1, its neighbours 0.5 (the learnable edge)
    partial = soft_box_mask(torch.tensor([[0.125, 0.0]]), 16, 8)[0, 0, :, 4]
    assert partial[8].item() == 1 and partial[7].item() == partial[9].item() == pytest.approx(0.5)
    assert math.isclose(partial.sum().item(), 2.0)


@pytest.mark.parametrize("bias", [True, False])
def test_shifted_depthwise_is_the_convolution_written_out(bias):
    conv = DepthwiseConv3x3(6, bias).double()
    x = images(2, 6, 9, 11).double().requires_grad_()
    results = {}
    for mode in ("conv", "shifted"):
        conv.mode = mode
        out = conv(x)
        results[mode] = (out, *torch.autograd.grad((out * out.detach().sin()).sum(), [x, *conv.parameters()]))
    for ours, reference in zip(results["shifted"], results["conv"]):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_shifted_depthwise_gives_a_convolutions_dtype_and_layout_under_autocast():
    conv = DepthwiseConv3x3(6, bias=True)
    x = images(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = conv(x)
        conv.mode = "shifted"
        ours = conv(x)
        float64 = conv(x.double())
    assert ours.dtype == reference.dtype == torch.bfloat16 and float64.dtype == torch.float64
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_depthwise_mode_changes_no_weight_and_no_output():
    reference = build_model(model_config("tiny")).double().eval()
    shifted = build_model(model_config("tiny", "depthwise=shifted")).double().eval()
    modes = {m.mode for m in shifted.modules() if isinstance(m, DepthwiseConv3x3)}
    assert modes == {"shifted"}
    assert len([m for m in shifted.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]) == \
        sum(isinstance(m, DepthwiseConv3x3) for m in shifted.modules())   # every depthwise conv switches
    ours, theirs = shifted.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    lq = images(1, 3, 32, 32).double()
    torch.testing.assert_close(shifted(lq).restored, reference(lq).restored, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- forward arithmetic
# Wiring that keeps every shape, gradient and parameter count when wrong: an official checkpoint would
# compute another function.
def test_skip_connections_concatenate_the_upsampled_features_first_then_the_encoders():
    """Official AdaIR/M2Restore order torch.cat([up(d), e], 1); a swapped or dropped skip keeps
    every shape and every gradient, but official checkpoints would then compute something else."""
    model = build_model(model_config("tiny")).eval()
    seen = {}

    def keep(name, inputs=False):
        def hook(_module, args, out):
            seen[name] = (args[0] if inputs else out).detach().clone()
        return hook
    for name in ("up4_3", "up3_2", "up2_1"):
        getattr(model, name).register_forward_hook(keep(name))
    for name in ("encoder_level1", "encoder_level2", "encoder_level3"):
        getattr(model, name)[-1].register_forward_hook(keep(name))
    model.reduce_chan_level3.register_forward_hook(keep("in3", inputs=True))
    model.reduce_chan_level2.register_forward_hook(keep("in2", inputs=True))
    model.decoder_level1[0].register_forward_hook(keep("in1", inputs=True))
    with torch.no_grad():
        model(images(1, 3, 16, 24))
    torch.testing.assert_close(seen["in3"], torch.cat([seen["up4_3"], seen["encoder_level3"]], 1))
    torch.testing.assert_close(seen["in2"], torch.cat([seen["up3_2"], seen["encoder_level2"]], 1))
    torch.testing.assert_close(seen["in1"], torch.cat([seen["up2_1"], seen["encoder_level1"]], 1))


def test_task_prompt_is_gelu_of_a_per_image_softmax_mix_of_the_dictionary():
    """The softmax is per image, over the dictionary's atoms: over the batch, each image's prompt would
    depend on the other images of its batch (results would change with batch size, tiling, processes)."""
    import torch.nn.functional as F

    from m2r.models.task_prompt import TaskPrompt

    torch.manual_seed(0)
    prompt = TaskPrompt(3, cond_channels=16, atoms=8, prompt_dim=12).eval()
    x = images(3, 3, 27, 36)
    with torch.no_grad():
        batched = prompt(x)
        alone = torch.cat([prompt(x[i:i + 1]) for i in range(3)])
        weights = prompt.lastOut(prompt.CondNet(x).mean((2, 3))).softmax(dim=-1)
    torch.testing.assert_close(batched, alone)
    torch.testing.assert_close(batched, F.gelu(weights @ prompt.dictionary))


def test_transposed_attention_scales_each_heads_cosines_by_its_temperature():
    """Each head (a contiguous block of channels) multiplies its cosines by its own temperature (learned:
    dividing would agree only at its initial value 1)."""
    import torch.nn.functional as F

    from m2r.models.restormer import transposed_attention

    b, c, h, w, heads = 2, 6, 3, 4, 2
    q, k, v = (images(b, c, h, w, seed=s) - 0.5 for s in (1, 2, 3))
    temperature = torch.tensor([2.0, 0.5]).view(heads, 1, 1)
    outs = []
    for head in range(heads):
        channels = slice(head * c // heads, (head + 1) * c // heads)
        qh, kh, vh = (t[:, channels].flatten(2) for t in (q, k, v))
        attn = F.normalize(qh, dim=-1) @ F.normalize(kh, dim=-1).transpose(1, 2) * temperature[head]
        outs.append((attn.softmax(-1) @ vh).view(b, -1, h, w))
    torch.testing.assert_close(transposed_attention(q, k, v, heads, temperature), torch.cat(outs, 1))


def _randomised(module, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _mamba_layer(scan="raster"):
    from m2r.models.bottleneck import MambaLayer

    torch.manual_seed(0)
    layer = MambaLayer(8, 4, d_state=4, scan=scan, scan_backend="torch").eval()
    _randomised(layer.norm, 1, 0.5)
    with torch.no_grad():
        layer.norm.weight.add_(1)
    return layer


def test_the_dgf_gate_weighs_the_mamba_branch_and_its_complement_the_conv_branch():
    """G * global + (1 - G) * local, not the other way round."""
    layer = _mamba_layer()
    x, embed = images(2, 8, 4, 5) - 0.5, images(2, 4)
    with torch.no_grad():
        for bias, expected in ((30.0, layer.global_branch(x)), (-30.0, layer.conv_path(x))):
            layer.gate_net[2].bias.fill_(bias)
            torch.testing.assert_close(layer(x, embed), expected)


@pytest.mark.parametrize("scan", ["bidirectional", "four_way"])
def test_multi_direction_scans_average_every_directions_output(scan):
    """Every direction's scan, mapped back to row-major order, is averaged (not only the raster one)."""
    from m2r.models.bottleneck import SCAN_ORDERS, from_scan_order, to_scan_order

    layer = _mamba_layer(scan)
    x = images(1, 8, 4, 5) - 0.5
    with torch.no_grad():
        grid = layer.norm(x.permute(0, 2, 3, 1))
        grids = [from_scan_order(layer.mamba(to_scan_order(grid, order)), order, 4, 5)
                 for order in SCAN_ORDERS[scan]]
        expected = layer.norm2(torch.stack(grids).mean(0)).permute(0, 3, 1, 2)
        torch.testing.assert_close(layer.global_branch(x), expected)
        assert not torch.allclose(grids[0], grids[1], atol=1e-4)


def test_mb_block_adds_the_mamba_layer_and_the_ffn_as_residuals():
    """X + MambaLayer(LN(x)), then + GDFN(LN(.)); a dropped residual keeps every shape and gradient."""
    from m2r.models.bottleneck import MB

    torch.manual_seed(0)
    block = MB(8, 4, 2.0, False, d_state=4, scan_backend="torch").eval()
    x, embed = images(2, 8, 4, 5) - 0.5, images(2, 4)
    with torch.no_grad():
        y = x + block.ssm(block.norm1(x), embed)
        torch.testing.assert_close(block(x, embed), y + block.ffn(block.norm2(y)))


def test_global_expert_names_renumber_the_experts_of_a_later_expert_parallel_rank():
    """Topology-independent names (EMA save and load, finetune init from an export) at ep_rank 1."""
    from m2r.engine.experts import global_expert_names

    model = build_model(model_config("tiny"), with_clip_prior=False)
    model.dder1.ep_rank = 1     # as rank 1 of ep_size 2 would have it (no process group needed)
    names = global_expert_names(model)
    local = "dder1.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"
    assert names[local] == local.replace(".0.", f".{model.dder1.num_local_experts}.")
    assert names["dder1.router.w_g"] == "dder1.router.w_g"
