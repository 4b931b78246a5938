"""DiffHarmony on CPU with a tiny random-weight checkpoint in the official layout.

Checks the harmonizer's contract (sizes, range, exact background, per-sample seeds), the stage-1
loop against a step-by-step reference made of diffusers primitives, the refiner's official
parameter names and residual, and model-directory handling (pickles, checks, remote copies).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_cvae import official_decode_with_cond
from tiny_checkpoint import write_tiny_model_dir

from pipeline.config import ModelConfig
from pipeline.models import load_harmonizer
from pipeline.models.base import HarmonizeBatch
from pipeline.models.cache import MANIFEST, cache_path, resolve_model_dir, verify_cache
from pipeline.models.check import check_model_dir
from pipeline.models.components import save_empty_prompt_embeds
from pipeline.models.condition_vae import ConditionVAE
from pipeline.models.diffharmony import DiffHarmonyHarmonizer, euler_ancestral_step
from pipeline.models.layout import ModelDirError, UnsafePickleError
from pipeline.models.refiner import RefinerUNet, refiner_preset

RESOLUTION = 64
OUTPUT_RESOLUTION = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _config(model_dir: str | Path, **overrides: object) -> ModelConfig:
    base = ModelConfig(
        name="diffharmony",
        model_dir=str(model_dir),
        resolution=RESOLUTION,
        output_resolution=OUTPUT_RESOLUTION,
        device="cpu",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def harmonizer(tiny_dir: Path) -> DiffHarmonyHarmonizer:
    loaded = load_harmonizer(_config(tiny_dir))
    assert isinstance(loaded, DiffHarmonyHarmonizer)
    return loaded


def _sample(height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    composite = torch.rand(3, height, width, generator=generator)
    mask = torch.zeros(1, height, width)
    mask[:, height // 4 : 3 * height // 4, width // 5 : width // 2 + 3] = 1.0
    return composite, mask


SAMPLES = {"a": _sample(50, 70, 1), "b": _sample(33, 41, 2), "c": _sample(64, 64, 3)}
SEEDS = {"a": 11, "b": 22, "c": 33}


def _batch(ids: list[str], seeds: dict[str, int] = SEEDS) -> HarmonizeBatch:
    return HarmonizeBatch(
        sample_ids=ids,
        composites=[SAMPLES[i][0] for i in ids],
        masks=[SAMPLES[i][1] for i in ids],
        seeds=[seeds[i] for i in ids],
    )


def _assert_same_pixels(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: batched or differently aligned CPU kernels differ by ~1e-6,
    while different weights, seeds or inputs move pixels by ~1e-1."""
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


# --- the harmonizer's contract -----------------------------------------------------------------


def test_outputs_have_input_sizes_range_and_exact_background(
    harmonizer: DiffHarmonyHarmonizer,
) -> None:
    ids = ["a", "b", "c"]
    outputs = harmonizer.harmonize(_batch(ids))
    for sample_id, output in zip(ids, outputs):
        composite, mask = SAMPLES[sample_id]
        assert output.shape == composite.shape
        assert output.dtype == torch.float32
        assert 0.0 <= output.min() and output.max() <= 1.0
        background = mask.expand_as(composite) < 0.5
        assert torch.equal(output[background], composite[background])
        # The model did change the foreground (random weights change it a lot).
        assert (output - composite).abs()[~background].mean() > 1e-2


def test_output_size_model_is_the_square_output_resolution(tiny_dir: Path) -> None:
    for refine in (True, False):
        model = load_harmonizer(_config(tiny_dir, output_size="model", refine=refine))
        outputs = model.harmonize(_batch(["a", "b"]))
        assert [tuple(o.shape) for o in outputs] == [(3, OUTPUT_RESOLUTION, OUTPUT_RESOLUTION)] * 2
        assert all(0.0 <= o.min() and o.max() <= 1.0 for o in outputs)


def test_a_sample_does_not_depend_on_its_batch(harmonizer: DiffHarmonyHarmonizer) -> None:
    alone = harmonizer.harmonize(_batch(["a"]))[0]
    in_batch = harmonizer.harmonize(_batch(["b", "a", "c"]))[1]
    reordered = harmonizer.harmonize(_batch(["c", "b", "a"]))[2]
    # A neighbour's noise leaking in, or a generator shared across the batch, would move pixels
    # by ~1e-1; batched kernels only round differently.
    _assert_same_pixels(in_batch, alone)
    _assert_same_pixels(reordered, alone)
    again = harmonizer.harmonize(_batch(["a"]))[0]
    assert torch.equal(again, alone)
    other_seed = harmonizer.harmonize(_batch(["a"], {**SEEDS, "a": 12}))[0]
    assert (other_seed - alone).abs().max() > 1e-2


def test_refine_false_is_stage1_alone_and_needs_no_refiner(
    tiny_dir: Path, tmp_path: Path, harmonizer: DiffHarmonyHarmonizer
) -> None:
    without_refiner = tmp_path / "model"
    shutil.copytree(tiny_dir, without_refiner)
    shutil.rmtree(without_refiner / "refiner")
    with pytest.raises(ModelDirError, match="refiner"):
        load_harmonizer(_config(without_refiner))

    model = load_harmonizer(_config(without_refiner, refine=False, output_size="model"))
    assert isinstance(model, DiffHarmonyHarmonizer) and model.refiner is None
    output = model.harmonize(_batch(["c"]))[0]  # "c" is already 64 x 64: no input resizing
    composite, mask = SAMPLES["c"]
    expected = harmonizer.stage1(
        composite[None] * 2 - 1, mask[None], [torch.Generator().manual_seed(SEEDS["c"])]
    )
    expected = F.interpolate(
        expected, size=(OUTPUT_RESOLUTION,) * 2, mode="bilinear", antialias=True
    )[0]
    torch.testing.assert_close(output, expected.clamp(0, 1), atol=1e-6, rtol=0)
    refined = load_harmonizer(_config(tiny_dir, output_size="model")).harmonize(_batch(["c"]))[0]
    assert (refined - output).abs().max() > 1e-2  # stage 2 does something


def test_resolution_must_be_a_multiple_of_8(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        load_harmonizer(_config(tiny_dir, resolution=60))


# --- stage 1 against diffusers primitives ------------------------------------------------------


def _reference_stage1(
    model: DiffHarmonyHarmonizer,
    tiny_dir: Path,
    composite: torch.Tensor,
    mask: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """The official pipeline's order of operations, batch size 1, diffusers' own scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    ids = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    prompt_embeds = text_encoder(ids)[0]
    scheduler_config = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler_config)

    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(model.config.steps)
    latents = randn_tensor((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    vae, unet = model.vae, model.unet
    image_latents = vae.encode(composite).latent_dist.sample(generator=generator)
    image_latents = image_latents * vae.config.scaling_factor
    mask_latents = F.interpolate(mask, size=(8, 8))
    for t in scheduler.timesteps:
        model_input = torch.cat(
            [scheduler.scale_model_input(latents, t), mask_latents, image_latents], dim=1
        )
        noise_pred = unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
        latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
    if isinstance(vae, ConditionVAE):
        # The official pipeline with a ConditionVAE: decode_with_cond(latents / scaling_factor,
        # cat([image, mask]), generator, sample_posterior=True), after the loop's draws.
        condition = torch.cat([composite, mask], dim=1)
        image = official_decode_with_cond(
            vae, latents / vae.config.scaling_factor, condition, generator
        )
    else:
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


@torch.inference_mode()
def test_stage1_equals_a_step_by_step_diffusers_reference(
    harmonizer: DiffHarmonyHarmonizer, tiny_dir: Path
) -> None:
    generator = torch.Generator().manual_seed(5)
    composite = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    mask = (torch.rand(3, 1, RESOLUTION, RESOLUTION, generator=generator) > 0.5).float()
    seeds = [101, 202, 303]
    batched = harmonizer.stage1(composite, mask, [torch.Generator().manual_seed(s) for s in seeds])
    for i, seed in enumerate(seeds):
        reference = _reference_stage1(
            harmonizer, tiny_dir, composite[i : i + 1], mask[i : i + 1], seed
        )
        assert (batched[i : i + 1] - reference).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def harmony_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("cvae") / "model", harmony_vae=True)


@torch.inference_mode()
def test_harmony_vae_stage1_is_the_official_pipelines_at_batch_1(
    harmony_vae_dir: Path, harmonizer: DiffHarmonyHarmonizer
) -> None:
    """DiffHarmony++: the same loop, then decode_with_cond as the official code orders it (its
    posterior drawn from the sample's generator after the last ancestral draw). fp32, batch 1:
    identical to the last bit."""
    model = load_harmonizer(_config(harmony_vae_dir))
    assert isinstance(model, DiffHarmonyHarmonizer) and isinstance(model.vae, ConditionVAE)
    skips = [p for n, p in model.vae.named_parameters() if "skip_conv" in n]
    assert skips and all(torch.count_nonzero(p) == p.numel() for p in skips)
    generator = torch.Generator().manual_seed(6)
    composite = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    mask = (torch.rand(2, 1, RESOLUTION, RESOLUTION, generator=generator) > 0.5).float()
    for i, seed in enumerate((7, 8)):
        sample = composite[i : i + 1], mask[i : i + 1]
        ours = model.stage1(*sample, [torch.Generator().manual_seed(seed)])
        assert torch.equal(ours, _reference_stage1(model, harmony_vae_dir, *sample, seed))
        # Same UNet, text side and scheduler as the plain folder: only the decoding differs.
        plain = harmonizer.stage1(*sample, [torch.Generator().manual_seed(seed)])
        assert (ours - plain).abs().max() > 1e-2
    assert model.fingerprint != harmonizer.fingerprint


def test_harmony_vae_output_does_not_depend_on_its_batch(harmony_vae_dir: Path) -> None:
    model = load_harmonizer(_config(harmony_vae_dir))
    alone = model.harmonize(_batch(["a"]))[0]
    _assert_same_pixels(model.harmonize(_batch(["b", "a", "c"]))[1], alone)
    _assert_same_pixels(model.harmonize(_batch(["c", "a"]))[1], alone)
    composite, mask = SAMPLES["a"]
    background = mask.expand_as(composite) < 0.5
    assert torch.equal(alone[background], composite[background])  # carried back as before


def test_harmony_vae_runs_in_bf16_on_the_cpu(harmony_vae_dir: Path) -> None:
    """Every tensor of the Harmony-VAE path in the run's dtype (the condition, its posterior
    noise). bf16 draws on the CPU differ from fp32 draws, so only range and finiteness are
    checked here; tests/test_cuda.py compares the dtypes on a GPU, where draws agree."""
    model = load_harmonizer(_config(harmony_vae_dir, dtype="bf16"))
    assert model.dtype == torch.bfloat16 and next(model.vae.parameters()).dtype == torch.bfloat16
    output = model.harmonize(_batch(["b"]))[0]
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
    assert 0.0 <= output.min() and output.max() <= 1.0


def test_euler_ancestral_step_is_the_schedulers_step_bit_for_bit(
    harmonizer: DiffHarmonyHarmonizer,
) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler.from_config(harmonizer.scheduler.config)
    scheduler.set_timesteps(5)
    sigmas = scheduler.sigmas.clone()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = latents.clone()
    for i, t in enumerate(scheduler.timesteps):
        noise_pred = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i + 1))
        scheduler.scale_model_input(latents, t)
        latents = scheduler.step(
            noise_pred, t, latents, generator=torch.Generator().manual_seed(100 + i)
        ).prev_sample
        ours = euler_ancestral_step(
            noise_pred, ours, sigmas[i], sigmas[i + 1], [torch.Generator().manual_seed(100 + i)]
        )
        assert torch.equal(ours, latents)


def test_empty_prompt_embedding_is_clips_and_can_be_precomputed(
    tiny_dir: Path, tmp_path: Path, harmonizer: DiffHarmonyHarmonizer
) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")(ids)[0]
    assert harmonizer.empty_prompt_embeds.shape == (1, 77, 32)
    torch.testing.assert_close(harmonizer.empty_prompt_embeds, expected)

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    save_empty_prompt_embeds(model_dir)
    shutil.rmtree(model_dir / "tokenizer")
    shutil.rmtree(model_dir / "text_encoder")
    assert check_model_dir(model_dir) == []
    model = load_harmonizer(_config(model_dir))
    _assert_same_pixels(model.harmonize(_batch(["b"]))[0], harmonizer.harmonize(_batch(["b"]))[0])


# --- stage 2: the refiner ----------------------------------------------------------------------


def test_refiner_base_config_has_the_official_parameter_names() -> None:
    from diffusers import UNet2DModel

    config = refiner_preset("base", in_channels=7)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in RefinerUNet(**config).state_dict().items()}
        # The official class is diffusers' UNet2DModel with the time embedding left out.
        reference_args = {k: v for k, v in config.items() if k != "input_residual"}
        reference = UNet2DModel(**reference_args).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items() if "time_emb" not in k}
    assert shapes == expected
    assert shapes["conv_in.weight"] == (128, 7, 3, 3)
    assert shapes["down_blocks.0.resnets.0.conv1.weight"] == (128, 128, 3, 3)
    assert shapes["down_blocks.0.downsamplers.0.conv.weight"] == (128, 128, 3, 3)
    assert shapes["down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["mid_block.attentions.0.group_norm.weight"] == (512,)
    assert shapes["mid_block.attentions.0.to_q.weight"] == (512, 512)
    assert shapes["mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert shapes["mid_block.resnets.1.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["up_blocks.0.resnets.2.conv_shortcut.weight"] == (512, 1024, 1, 1)
    assert shapes["up_blocks.0.upsamplers.0.conv.weight"] == (512, 512, 3, 3)
    assert shapes["up_blocks.3.resnets.2.conv1.weight"] == (128, 256, 3, 3)
    assert shapes["conv_norm_out.weight"] == (128,)
    assert shapes["conv_out.weight"] == (3, 128, 3, 3)
    assert not any(k.startswith("down_blocks.3.downsamplers") for k in shapes)
    assert not any(k.startswith("up_blocks.3.upsamplers") for k in shapes)
    assert not any("time" in k for k in shapes)


def test_refiner_round_trips_strictly_through_the_official_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RefinerUNet(**refiner_preset("small", in_channels=7))
    model.save_pretrained(tmp_path / "refiner")
    config = json.loads((tmp_path / "refiner" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DCustom" and config["in_channels"] == 7
    assert (tmp_path / "refiner" / "diffusion_pytorch_model.safetensors").is_file()

    loaded, info = RefinerUNet.from_pretrained(tmp_path / "refiner", output_loading_info=True)
    assert not any(info.values()), info

    def public(config: dict[str, object]) -> object:  # JSON reads tuples back as lists
        return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

    assert public(loaded.config) == public(model.config)
    result = RefinerUNet.from_config(config).load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, value), (loaded_name, loaded_value) in zip(
        model.state_dict().items(), loaded.state_dict().items()
    ):
        assert name == loaded_name and torch.equal(value, loaded_value)
    sample = torch.rand(1, 7, 32, 48) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(loaded(sample), model.eval()(sample))


def test_refiner_with_a_zero_body_returns_its_residual_input() -> None:
    config = {**refiner_preset("small", in_channels=7), "block_out_channels": (32, 32, 64, 64)}
    model = RefinerUNet(**config).eval()
    for parameter in model.parameters():
        parameter.data.zero_()
    sample = torch.rand(2, 7, 40, 24) * 2 - 1  # 40 x 24: not multiples of 8, sizes still match
    with torch.inference_mode():
        output = model(sample)
        assert torch.equal(output, sample[:, :3])
        no_residual = RefinerUNet(**{**config, "input_residual": False}).eval()
        for parameter in no_residual.parameters():
            parameter.data.zero_()
        assert torch.equal(no_residual(sample), torch.zeros(2, 3, 40, 24))


def test_refiner_refuses_unsupported_input_channels(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in_channels"):
        RefinerUNet(**refiner_preset("small", in_channels=5))
    # A config with keys the official class does not take is another model: refused by name.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    config = json.loads((model_dir / "refiner" / "config.json").read_text())
    (model_dir / "refiner" / "config.json").write_text(
        json.dumps({**config, "time_embedding_type": "positional"})
    )
    assert check_model_dir(model_dir) == [
        "refiner/config.json: time_embedding_type: not arguments of the official UNet2DCustom"
    ]


# --- model directories -------------------------------------------------------------------------


def test_pickled_weights_are_refused_unless_allowed(
    tmp_path: Path, harmonizer: DiffHarmonyHarmonizer
) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "model", safetensors=False)
    assert not list(model_dir.rglob("*.safetensors"))
    with pytest.raises(UnsafePickleError, match="allow_unsafe_pickle"):
        load_harmonizer(_config(model_dir))
    problems = check_model_dir(model_dir)
    assert any("unet/" in p and "pickle" in p for p in problems)
    assert check_model_dir(model_dir, allow_unsafe_pickle=True) == []

    model = load_harmonizer(_config(model_dir, allow_unsafe_pickle=True))
    # Same seeded weights as the safetensors directory, so the same pixels (up to CPU kernels
    # rounding differently for differently aligned weight buffers, ~1e-6).
    _assert_same_pixels(model.harmonize(_batch(["a"]))[0], harmonizer.harmonize(_batch(["a"]))[0])


def test_check_model_dir_names_what_is_wrong(tiny_dir: Path, tmp_path: Path) -> None:
    assert check_model_dir(tiny_dir) == []
    assert check_model_dir(tmp_path / "nowhere") == [
        f"{tmp_path / 'nowhere'}: model directory not found"
    ]

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    (model_dir / "unet" / "config.json").write_text(json.dumps({**unet_config, "in_channels": 4}))
    refiner_config = json.loads((model_dir / "refiner" / "config.json").read_text())
    (model_dir / "refiner" / "config.json").write_text(
        json.dumps({**refiner_config, "block_out_channels": [8, 32]})
    )
    shutil.rmtree(model_dir / "vae")
    problems = check_model_dir(model_dir)
    assert any(p.startswith("unet/") and "in_channels is 4" in p for p in problems)
    assert any(p.startswith("vae/") and "missing" in p for p in problems)
    assert any(p.startswith("refiner/") and "shape" in p for p in problems)
    assert {p.split("/")[0] for p in problems} == {"unet", "vae", "refiner"}, problems
    with pytest.raises(ModelDirError, match="in_channels is 4"):
        load_harmonizer(_config(model_dir))


@pytest.fixture
def memory_model_uri(tiny_dir: Path) -> Iterator[str]:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/models/{uuid.uuid4().hex}"
    for path in tiny_dir.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(tiny_dir).as_posix()}", path.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def count_fetches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URIs the node cache copies from, one entry per copy."""
    from pipeline.models import cache

    fetches: list[str] = []
    real_fetch = cache._fetch_tree

    def counting_fetch(*args: object, **kwargs: object) -> None:
        fetches.append(str(args[-1]))
        real_fetch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "_fetch_tree", counting_fetch)
    return fetches


def test_remote_model_dir_is_copied_once_and_checked(
    memory_model_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    harmonizer: DiffHarmonyHarmonizer,
) -> None:
    fetches = count_fetches(monkeypatch)
    cache = tmp_path / "cache"
    local = resolve_model_dir(memory_model_uri, cache_dir=cache)
    assert (
        local == cache_path(memory_model_uri, cache) and (local / "unet" / "config.json").is_file()
    )
    assert verify_cache(local) == []
    assert resolve_model_dir(memory_model_uri, cache_dir=cache) == local
    assert len(fetches) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp folders

    model = load_harmonizer(_config(memory_model_uri, cache_dir=str(cache)))
    assert len(fetches) == 1
    assert model.fingerprint == harmonizer.fingerprint  # same files, same fingerprint
    _assert_same_pixels(model.harmonize(_batch(["b"]))[0], harmonizer.harmonize(_batch(["b"]))[0])

    weights = local / "vae" / "diffusion_pytorch_model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    problems = verify_cache(local)
    assert problems == [
        "vae/diffusion_pytorch_model.safetensors: sha256 differs from the manifest (corrupted)"
    ]
    assert resolve_model_dir(memory_model_uri, cache_dir=cache) == local
    assert len(fetches) == 2 and verify_cache(local) == []

    # A changed remote directory (here a file that grew) is fetched again.
    import fsspec

    remote = memory_model_uri.removeprefix("memory://") + "/scheduler/scheduler_config.json"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(remote, fs.cat_file(remote) + b"\n")
    resolve_model_dir(memory_model_uri, cache_dir=cache)
    assert len(fetches) == 3
    assert (local / "scheduler" / "scheduler_config.json").read_bytes() == fs.cat_file(remote)


def test_concurrent_loads_on_one_node_copy_once(
    memory_model_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fetches = count_fetches(monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        paths = list(
            pool.map(lambda _: resolve_model_dir(memory_model_uri, cache_dir=tmp_path), range(4))
        )
    assert len(set(paths)) == 1 and len(fetches) == 1
    assert verify_cache(paths[0]) == []


def test_file_uri_is_copied_to_the_cache(tiny_dir: Path, tmp_path: Path) -> None:
    uri = tiny_dir.as_uri()
    assert uri.startswith("file://")
    local = resolve_model_dir(uri, cache_dir=tmp_path / "cache")
    assert local.parent == tmp_path / "cache" and (local / MANIFEST).is_file()
    manifest = json.loads((local / MANIFEST).read_text())
    assert set(manifest["files"]) == {
        p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()
    }
    assert check_model_dir(local) == []
