"""DiffHarmony: latent-diffusion harmonization (stage 1) plus the refinement UNet (stage 2).

Enters: a `HarmonizeBatch` (full-resolution composites (3, H_i, W_i) in [0, 1], binary masks,
per-sample seeds).
Leaves: one harmonized image per sample through `Harmonizer.finish`: at each input's own size with
the background pixel-exact, or the official square `output_resolution` image as the model made
it (background included: the VAE's reconstruction, not the composite's pixels).

Inference follows the official `scripts/inference/main.py` + `StableDiffusionHarmonyPipeline`:
composite and mask resized straight to a square `resolution`, 5 Euler-ancestral steps from pure
noise with the 9-channel UNet conditioned on the empty prompt (guidance 1.0), VAE decode, then the
refiner at `output_resolution` on cat([stage-1, mask, composite]). Differences, all deliberate:
- one torch.Generator per sample (seeded from `sample_seed`) rather than one per batch, so a
  sample's output does not depend on its neighbours; with batch size 1 the draws are the
  official ones (initial latents, then the composite's posterior sample, then one ancestral
  noise per step);
- the ancestral step is written out below (the scheduler's `step` takes one generator for the
  whole batch); it is the same arithmetic as `EulerAncestralDiscreteScheduler.step` and the tests
  check it against that method;
- PyTorch SDPA attention instead of xformers; fp32 on CPU (the official script runs fp16 only).

DiffHarmony++'s Harmony-VAE (`vae/config.json` saying "ConditionVAE") decodes as the official
pipeline's `decode_with_cond`: the condition cat([composite in [-1, 1], mask]) at the working
resolution goes through its conditional encoder, whose posterior is sampled with the sample's
generator after the last ancestral draw; the decoder takes that latent (through
`latent_skip_conv`) and the conditional encoder's skip features.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from pipeline.config import ModelConfig
from pipeline.imaging import binarize, resize, resize_each
from pipeline.models.base import (
    HarmonizeBatch,
    Harmonizer,
    fingerprint_of,
    resolve_device,
    resolve_dtype,
)
from pipeline.models.components import DiffHarmonyComponents, load_components
from pipeline.models.condition_vae import ConditionVAE
from pipeline.models.layout import CONDITION_VAE_CLASS_NAME

FINGERPRINT_VERSION = "diffharmony-v1"


class DiffHarmonyHarmonizer(Harmonizer):
    """The two stages around injected components, as a diffusers pipeline is built: the
    constructor takes the modules as they are (their device and dtype are the harmonizer's) and
    reads nothing; `from_model_dir` loads a model directory and calls it."""

    name = "diffharmony"

    def __init__(self, components: DiffHarmonyComponents, config: ModelConfig) -> None:
        super().__init__(config, device=components.unet.device)
        if config.refine and components.refiner is None:
            raise ValueError("refine is on but the components hold no refiner")
        self.dtype = components.unet.dtype
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler = components.scheduler
        self.refiner = components.refiner
        self.empty_prompt_embeds = components.empty_prompt_embeds  # (1, 77, D)
        # DiffHarmony++'s Harmony-VAE decodes with the input's help (`condition_vae.py`).
        self.harmony_vae = isinstance(self.vae, ConditionVAE)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if config.resolution % self.vae_scale_factor != 0:
            raise ValueError(
                f"resolution {config.resolution} is not a multiple of the VAE's "
                f"downsampling factor {self.vae_scale_factor}"
            )

        settings = {
            "resolution": config.resolution,
            "steps": config.steps,
            "refine": config.refine,
            "output_size": config.output_size,
            "output_resolution": config.output_resolution,
            "dtype": str(self.dtype),
            # CPU and CUDA generators draw different numbers from the same seed.
            "device_type": self.device.type,
        }
        if self.harmony_vae:  # (absent for the plain VAE: earlier fingerprints stay valid)
            settings["decoder"] = CONDITION_VAE_CLASS_NAME
        self._fingerprint = fingerprint_of(
            FINGERPRINT_VERSION,
            json.dumps(components.checksums, sort_keys=True),
            json.dumps(components.configs, sort_keys=True, default=str),
            json.dumps(settings, sort_keys=True),
        )

    @classmethod
    def from_model_dir(
        cls, config: ModelConfig, storage_options: dict[str, Any] | None = None
    ) -> DiffHarmonyHarmonizer:
        """Load `config.model_dir` (a path or URI, copied once per node) on `config.device` in
        `config.dtype`; the refiner only when `config.refine`."""
        assert config.model_dir  # ModelConfig requires one for this model
        device = resolve_device(config.device)
        components = load_components(
            config.model_dir,
            device=device,
            dtype=resolve_dtype(config.dtype, device),
            load_refiner=config.refine,
            allow_unsafe_pickle=config.allow_unsafe_pickle,
            cache_dir=config.cache_dir,
            storage_options=storage_options,
        )
        return cls(components, config)

    @classmethod
    def load(
        cls, config: ModelConfig, storage_options: dict[str, Any] | None = None
    ) -> DiffHarmonyHarmonizer:
        return cls.from_model_dir(config, storage_options)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.inference_mode()
    def harmonize(self, batch: HarmonizeBatch) -> list[torch.Tensor]:
        if len(batch) == 0:
            return []
        # One move to the device (a no-op when the caller already put the batch there).
        batch = dataclasses.replace(
            batch,
            composites=[image.to(self.device) for image in batch.composites],
            masks=[mask.to(self.device) for mask in batch.masks],
        )
        size = self.config.resolution
        composite = resize_each(batch.composites, size).clamp(0, 1)  # (B, 3, R, R), aspect not kept
        mask = _resize_masks(batch.masks, size)  # (B, 1, R, R) in {0, 1}
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in batch.seeds]

        harmonized = self.stage1(composite * 2 - 1, mask, generators)  # (B, 3, R, R) in [0, 1]
        if self.config.refine:
            out = self.config.output_resolution
            # As the official loader: composite and mask resized from the originals, not from R.
            composite_out = resize_each(batch.composites, out).clamp(0, 1)  # (B, 3, r, r)
            mask_out = _resize_masks(batch.masks, out)  # (B, 1, r, r)
            harmonized = self.stage2(harmonized, composite_out, mask_out)  # (B, 3, r, r)
        return self.finish(batch, harmonized)

    @torch.inference_mode()
    def stage1(
        self, composite: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Stage 1, the whole sampling loop.

        composite: (B, 3, R, R) in [-1, 1]; mask: (B, 1, R, R) in {0, 1}; one generator per
        sample. Returns (B, 3, R, R) float32 in [0, 1].
        """
        batch_size = composite.shape[0]
        height, width = composite.shape[-2:]
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        scaling_factor = self.vae.config.scaling_factor
        composite = composite.to(self.device, self.dtype)
        mask = mask.to(self.device, self.dtype)

        # Only the schedule is taken from the scheduler; its stateful scale/step are written out
        # below, so nothing in the loop reads a device value back to the host.
        self.scheduler.set_timesteps(self.config.steps, device=self.device)
        timesteps = self.scheduler.timesteps  # (S,) on the device
        sigmas = self.scheduler.sigmas  # (S + 1,) float32 on the CPU, last one 0

        # Random draw 1 of each generator: the initial latents, pure noise.
        latents = randn_tensor(
            (batch_size, self.vae.config.latent_channels, *latent_hw),
            generator=generators,
            device=self.device,
            dtype=self.dtype,
        )  # (B, 4, h, w)
        latents = latents * self.scheduler.init_noise_sigma

        # Random draw 2: the composite's posterior sample. The composite is not masked.
        posterior = self.vae.encode(composite).latent_dist
        posterior_noise = randn_tensor(
            posterior.mean.shape,
            generator=generators,
            device=self.device,
            dtype=posterior.mean.dtype,
        )
        composite_latent = (posterior.mean + posterior.std * posterior_noise) * scaling_factor
        mask_latent = F.interpolate(mask, size=latent_hw)  # (B, 1, h, w), nearest
        prompt_embeds = self.empty_prompt_embeds.expand(batch_size, -1, -1)  # (B, 77, D)

        for i, t in enumerate(timesteps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # scale_model_input: x / sqrt(sigma^2 + 1)
            model_input = torch.cat(
                [latents / ((sigma**2 + 1) ** 0.5), mask_latent, composite_latent], dim=1
            )  # (B, 9, h, w)
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False
            )[0]  # (B, 4, h, w); guidance 1.0, so no unconditional pass
            # Random draw 3 + i: the ancestral noise of this step.
            latents = euler_ancestral_step(noise_pred, latents, sigma, sigma_next, generators)

        if self.harmony_vae:
            # DiffHarmony++'s decode_with_cond: the input image and mask encoded by the
            # Harmony-VAE's conditional encoder, its posterior sampled by random draw
            # 3 + steps (after the last ancestral draw), its features helping the decoder.
            condition = torch.cat([composite, mask], dim=1)  # (B, 4, R, R)
            posterior, features = self.vae.encode_condition(condition)
            condition_noise = randn_tensor(
                posterior.mean.shape,
                generator=generators,
                device=self.device,
                dtype=posterior.mean.dtype,
            )
            condition_latent = posterior.mean + posterior.std * condition_noise  # (B, 4, h, w)
            image = self.vae.decode_with_condition(
                latents / scaling_factor, condition_latent, features
            )  # (B, 3, R, R)
        else:
            image = self.vae.decode(latents / scaling_factor, return_dict=False)[0]  # (B, 3, R, R)
        return (image / 2 + 0.5).clamp(0, 1).float()

    @torch.inference_mode()
    def stage2(
        self, harmonized: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Refinement at `output_resolution`.

        harmonized: (B, 3, R, R) stage-1 output in [0, 1]; composite (B, 3, r, r) in [0, 1];
        mask (B, 1, r, r). Returns (B, 3, r, r) float32 in [0, 1].
        """
        assert self.refiner is not None
        size = tuple(composite.shape[-2:])
        harmonized = resize(harmonized * 2 - 1, size).clamp(-1, 1)  # (B, 3, r, r) in [-1, 1]
        in_channels = self.refiner.config.in_channels
        parts = [harmonized, mask, composite * 2 - 1][: {3: 1, 4: 2, 7: 3}[in_channels]]
        refiner_input = torch.cat(parts, dim=1).to(self.dtype)  # (B, in_channels, r, r)
        refined = self.refiner(refiner_input).clamp(-1, 1)  # (B, 3, r, r)
        return ((refined.float() + 1) / 2).clamp(0, 1)


def _resize_masks(masks: list[torch.Tensor], size: int) -> torch.Tensor:
    """(1, H_i, W_i) masks -> (B, 1, size, size) in {0, 1}: nearest, then >= 0.5.

    "nearest-exact" samples pixel centres as PIL's NEAREST does (the official loader resizes a
    1-bit PIL mask), and so stays aligned with the bilinear-resized composite.
    """
    resized = [
        F.interpolate(m[None].float(), size=(size, size), mode="nearest-exact") for m in masks
    ]
    return binarize(torch.cat(resized))


def euler_ancestral_step(
    noise_pred: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """One Euler-ancestral step (epsilon prediction) with each sample's noise from its generator.

    `EulerAncestralDiscreteScheduler.step` operation for operation (fp32 upcast included), so
    the result is the same to the last bit (tested against diffusers' own step); only the noise
    is drawn per sample. `sigma`, `sigma_next`: 0-d CPU tensors from `scheduler.sigmas`.
    Returns latents in `noise_pred`'s dtype.
    """
    sample = latents.to(torch.float32)  # the scheduler upcasts for this step
    pred_original_sample = sample - sigma * noise_pred
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (sample - pred_original_sample) / sigma
    prev_sample = sample + derivative * (sigma_down - sigma)
    noise = randn_tensor(
        noise_pred.shape, generator=generators, device=noise_pred.device, dtype=noise_pred.dtype
    )
    prev_sample = prev_sample + noise * sigma_up
    return prev_sample.to(noise_pred.dtype)
