"""The frozen CLIP prior: DA-CLIP's layout on stock open_clip, strict loading, preprocessing, outputs."""
import json

import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from m2r.config import ConfigError
from m2r.models.clip_prior import (CLIPPrior, DaCLIP, build_clip_prior, build_daclip,
                                   clip_architecture)
from m2r.models.config import OFFICIAL_PROMPTS, ClipConfig

SIZE = 32


def tiny_cfg(**overrides) -> ClipConfig:
    return ClipConfig(**{"kind": "tiny", "image_size": SIZE, **overrides})


def images(batch=2, height=40, width=56, seed=0):
    """Non-square inputs in [-1, 1], so the prior must resize and crop."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_daclip() -> DaCLIP:
    return build_daclip(clip_architecture(tiny_cfg())).eval()


def randomise_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def prior() -> CLIPPrior:
    return build_clip_prior(OmegaConf.structured(tiny_cfg()), "minus_one_one")


def test_daclip_vit_b32_layout_matches_the_released_checkpoint():
    with torch.device("meta"):
        model = build_daclip(clip_architecture(ClipConfig(kind="daclip", arch="ViT-B-32")))
    keys = list(model.state_dict())
    groups = {name: sum(key.split(".")[0] == name for key in keys)
              for name in ("clip", "visual", "visual_control", "logit_scale")}
    assert len(keys) == 631
    assert groups == {"clip": 302, "visual": 152, "visual_control": 176, "logit_scale": 1}
    assert model.visual_control.transformer.zero_modules[11].weight.shape == (768, 768)


def test_outputs_are_prompt_probabilities_and_the_content_embedding(prior):
    probs, embed = prior(images())
    assert probs.shape == (2, len(OFFICIAL_PROMPTS)) == (2, prior.num_prompts)
    assert embed.shape == (2, prior.embed_dim) == (2, 32)
    assert probs.dtype == embed.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2))


def test_prior_is_frozen_and_stays_in_eval_mode(prior):
    assert not any(param.requires_grad for param in prior.parameters())
    prior.train()
    assert not any(module.training for module in prior.modules())
    probs, embed = prior(images().requires_grad_())
    assert probs.grad_fn is None and embed.grad_fn is None


def test_cached_text_features_give_the_same_outputs_without_reencoding(monkeypatch):
    uncached = build_clip_prior(tiny_cfg(), "minus_one_one")
    cached = build_clip_prior(tiny_cfg(cache_text_features=True), "minus_one_one")

    def no_text_encoding(*args):
        raise AssertionError("cached prior re-encoded its prompts")

    monkeypatch.setattr(cached.model, "encode_text", no_text_encoding)
    for expected, actual in zip(uncached(images()), cached(images())):
        torch.testing.assert_close(actual, expected)
    # The text tower is freed: only the image towers remain on the device.
    kept = {name for name, _ in cached.named_parameters()}
    dropped = {name for name, _ in uncached.named_parameters()} - kept
    assert dropped and all(name.startswith(("model.clip.transformer.", "model.clip.token_embedding.",
                                            "model.clip.positional_embedding", "model.clip.ln_final.",
                                            "model.clip.text_projection")) for name in dropped)
    assert not any(name.startswith("model.clip.visual") for name in dropped)


def test_zero_controller_leaves_the_main_tower_equal_to_plain_clip():
    model = tiny_daclip()
    assert all(not param.any() for param in model.visual_control.transformer.zero_modules.parameters())
    randomise_(model.visual_control.transformer.transformer, seed=1)  # controller blocks only
    pixels = images(height=SIZE, width=SIZE)
    with torch.no_grad():
        image_features, degra_features = model.encode_image(pixels, control=True)
        torch.testing.assert_close(image_features, model.clip.encode_image(pixels))
        assert not torch.allclose(degra_features, image_features)


def test_first_controller_block_steers_the_last_main_block():
    """DA-CLIP adds the controller's signals in reverse: main block i gets controller block L-1-i."""
    model = tiny_daclip()
    signal = torch.randn(64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.visual_control.transformer.zero_modules[0].bias.copy_(signal)
    pixels = images(height=SIZE, width=SIZE)
    with torch.no_grad():
        steered, _ = model.encode_image(pixels, control=True)
        hook = model.clip.visual.transformer.resblocks[-1].register_forward_hook(
            lambda module, args, output: output + signal)
        expected = model.clip.encode_image(pixels)
        hook.remove()
    torch.testing.assert_close(steered, expected)


def _save_plain(state, path):
    torch.save(state, path)


def _save_training_checkpoint(state, path):
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


def _save_safetensors(state, path):
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("save, suffix", [(_save_plain, ".pt"), (_save_training_checkpoint, ".pt"),
                                          (_save_safetensors, ".safetensors")])
def test_daclip_weights_load_strictly_from_every_checkpoint_format(tmp_path, save, suffix):
    trained = tiny_daclip()
    randomise_(trained, seed=3)
    path = tmp_path / f"daclip{suffix}"
    save(trained.state_dict(), path)
    prior = build_clip_prior(tiny_cfg(weights=str(path)), "minus_one_one")
    loaded = prior.model.state_dict()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded[key], value, msg=key)


@pytest.mark.parametrize("corrupt, reason", [
    (lambda s: s.pop("visual_control.transformer.zero_modules.1.bias"), "1 missing keys"),
    (lambda s: s.update(extra=torch.zeros(1)), "1 unexpected keys"),
    (lambda s: s.update(logit_scale=torch.zeros(2)), "size mismatch"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, corrupt, reason):
    state = tiny_daclip().state_dict()
    corrupt(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=reason) as error:
        build_clip_prior(tiny_cfg(weights=str(path)), "minus_one_one")
    assert "model.clip.weights" in str(error.value) and str(path) in str(error.value)


def test_an_unreadable_checkpoint_names_the_config_key(tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"model.clip.weights.*cannot read {path}"):
        build_clip_prior(tiny_cfg(weights=str(path)), "minus_one_one")


@pytest.mark.parametrize("kind", ["daclip", "openclip"])
def test_missing_weights_name_the_config_key_and_path(kind):
    path = "/nonexistent/daclip_ViT-B-32.pt"
    with pytest.raises(ConfigError, match=f"model.clip.weights.*{path}"):
        build_clip_prior(ClipConfig(kind=kind, weights=path), "minus_one_one")
    with pytest.raises(ConfigError, match="model.clip.weights"):
        build_clip_prior(ClipConfig(kind=kind), "minus_one_one")


def test_invalid_settings_name_their_config_key():
    with pytest.raises(ConfigError, match="model.clip.kind"):
        build_clip_prior(tiny_cfg(kind="siglip"), "minus_one_one")
    with pytest.raises(ConfigError, match="model.clip.image_size"):
        build_clip_prior(tiny_cfg(image_size=36), "minus_one_one")
    with pytest.raises(ConfigError, match="model.input_range"):
        build_clip_prior(tiny_cfg(), "zero_to_one")


def test_openclip_kind_scores_prompts_with_the_image_embedding(tmp_path):
    config_path = tmp_path / "m2r-test-tiny-clip.json"
    config_path.write_text(json.dumps(clip_architecture(tiny_cfg())))
    open_clip.add_model_config(config_path)
    clip = open_clip.CLIP(**clip_architecture(tiny_cfg())).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    prior = build_clip_prior(ClipConfig(kind="openclip", arch="m2r-test-tiny-clip", image_size=SIZE,
                                        weights=str(tmp_path / "clip.pt")), "minus_one_one")
    pixels = images(height=SIZE, width=SIZE)
    probs, embed = prior(pixels)
    with torch.no_grad():
        image_features = clip.encode_image(pixels)
        text_features = clip.encode_text(open_clip.tokenize(OFFICIAL_PROMPTS))
    cosine = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    expected = (100 * cosine).softmax(dim=-1)
    torch.testing.assert_close(embed, image_features)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("input_range, normalize", [("minus_one_one", False), ("minus_one_one", True),
                                                    ("zero_one", True)])
def test_clip_sees_the_resized_centre_crop_normalised_only_on_request(input_range, normalize):
    prior = build_clip_prior(tiny_cfg(normalize=normalize), input_range)
    image = images(height=48, width=80)
    if input_range == "zero_one":
        image = (image + 1) / 2
    expected = TF.center_crop(TF.resize(image, SIZE, antialias=True), SIZE)
    if normalize:
        unit = (expected + 1) / 2 if input_range == "minus_one_one" else expected
        expected = TF.normalize(unit, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    seen = []
    prior.model.visual.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    prior(image)
    torch.testing.assert_close(seen[0], expected)


def test_prior_runs_in_its_own_dtype_and_returns_float32():
    prior = build_clip_prior(tiny_cfg(cache_text_features=True), "minus_one_one").double()
    assert prior.cached_text_features.dtype == torch.float64
    probs, embed = prior(images())
    assert probs.dtype == embed.dtype == torch.float32


def test_building_a_prior_leaves_the_callers_random_state_alone():
    state = torch.random.get_rng_state()
    build_clip_prior(tiny_cfg(), "minus_one_one")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prior_moves_to_cuda_with_its_prompts_and_runs_in_half_precision():
    prior = build_clip_prior(tiny_cfg(cache_text_features=True), "minus_one_one")
    expected_probs, expected_embed = prior(images())
    prior.cuda()
    probs, embed = prior(images().cuda())
    torch.testing.assert_close(probs.cpu(), expected_probs, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(embed.cpu(), expected_embed, atol=1e-2, rtol=1e-2)
    half_probs, half_embed = prior.half()(images().cuda())
    assert half_probs.dtype == half_embed.dtype == torch.float32
    assert torch.isfinite(half_probs).all() and torch.isfinite(half_embed).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the official autocast is CUDA's")
@pytest.mark.parametrize("fp16_autocast, tower_dtype", [(True, torch.float16), (False, torch.float32)])
def test_on_cuda_the_official_prior_runs_under_fp16_autocast_and_plus_in_the_networks_precision(fp16_autocast,
                                                                                              tower_dtype):
    prior = build_clip_prior(tiny_cfg(fp16_autocast=fp16_autocast), "minus_one_one").cuda()
    seen = []
    first_linear = prior.model.visual.transformer.resblocks[0].mlp.c_fc   # the main tower's first MLP layer
    hook = first_linear.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    probs, embed = prior(images().cuda())
    hook.remove()
    assert seen and set(seen) == {tower_dtype}
    assert probs.dtype == embed.dtype == torch.float32


def test_off_cuda_the_fp16_autocast_setting_changes_nothing():
    """The official code runs only on CUDA; on CPU both settings compute in the network's precision."""
    official = build_clip_prior(tiny_cfg(fp16_autocast=True), "minus_one_one")
    in_network_precision = build_clip_prior(tiny_cfg(fp16_autocast=False), "minus_one_one")
    in_network_precision.model.load_state_dict(official.model.state_dict())
    for expected, got in zip(official(images()), in_network_precision(images())):
        assert torch.equal(expected, got)


def test_prior_returns_the_steered_image_embedding_and_scores_the_controllers_one():
    """With a trained controller the two DA-CLIP embeddings differ; the prior must return the
    main tower's (image) embedding and score prompts with the controller's (degradation) one."""
    import torch.nn.functional as F

    from m2r.models.clip_prior import COSINE_SCALE

    prior = build_clip_prior(OmegaConf.structured(tiny_cfg()), "minus_one_one")
    randomise_(prior.model.visual_control, seed=1)
    x = images()
    with torch.no_grad():
        probs, embed = prior(x)
        image_features, degra_features = prior.model.encode_image(prior.preprocess(x), control=True)
        text = prior.model.encode_text(prior.prompt_tokens)
    assert not torch.allclose(image_features, degra_features)
    torch.testing.assert_close(embed, image_features.float())
    cosine = F.normalize(degra_features, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(probs, (COSINE_SCALE * cosine).softmax(-1))


def test_a_bf16_prior_resizes_an_input_of_another_size_than_clips():
    """The CPU has no bf16 antialiased bilinear kernel: the resize runs in fp32 and gives the bf16
    prior what a fp32 resize gives, rounded (a bf16 run at a crop other than clip.image_size stopped)."""
    prior = build_clip_prior(tiny_cfg(), "minus_one_one").to(torch.bfloat16)
    image = images(height=48, width=80)
    seen = []
    prior.model.visual.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    probs, _ = prior(image.to(torch.bfloat16))
    expected = TF.center_crop(TF.resize(image.to(torch.bfloat16).float(), SIZE, antialias=True), SIZE)
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], expected.to(torch.bfloat16))
    assert torch.isfinite(probs).all()


def test_the_fp16_autocast_setting_does_not_make_another_network():
    """Weights saved before the key existed (its default, false) resume and load into the faithful config."""
    from m2r.config import load_config
    from m2r.models.config import ModelConfig, require_same_network

    faithful = load_config(ModelConfig, "configs/model/m2restore.yaml")
    assert faithful.clip.fp16_autocast is True
    saved = OmegaConf.to_container(faithful)
    del saved["clip"]["fp16_autocast"]
    require_same_network(saved, faithful, "run.resume", "a checkpoint", "")


def test_without_the_official_fp16_autocast_the_prior_follows_the_callers_autocast(monkeypatch):
    """clip.fp16_autocast=false (the plus recipe) means 'in the network's precision': under a caller's bf16
    autocast on CUDA the tower must run in bf16, not be switched to fp32 (as an `enabled=False` CUDA autocast
    did). Replayed on CPU: CUDA autocasts are mapped to the CPU's."""
    import m2r.models.clip_prior as clip_prior_module

    real_autocast = torch.autocast

    class CudaAsCpu(real_autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    monkeypatch.setattr(clip_prior_module.torch, "autocast", CudaAsCpu)
    prior = build_clip_prior(tiny_cfg(fp16_autocast=False), "minus_one_one")
    seen = []
    hook = prior.model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype))
    with real_autocast("cpu", dtype=torch.bfloat16):
        probs, embed = prior(images())
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert probs.dtype == embed.dtype == torch.float32
