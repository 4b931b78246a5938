"""The DiffHarmony model directory: its layout, and the errors that say what is wrong with one.

Enters: nothing (names and types only).
Leaves: the folder and file names every other module of `pipeline.models` uses, and
`ModelDirError` / `UnsafePickleError`, whose messages are one line a problem.

Expected layout (the official release's components, in diffusers folder layout):

    ROOT/
      tokenizer/     CLIPTokenizer: tokenizer.json, or vocab.json + merges.txt   SD inpainting
      text_encoder/  CLIPTextModel config.json + weights                          SD inpainting
      scheduler/     scheduler_config.json                                        SD inpainting
      vae/           AutoencoderKL config.json + weights                          sd-vae-ft-mse
                     (or ConditionVAE: DiffHarmony++'s Harmony-VAE, the release's cvae)
      unet/          UNet2DConditionModel, in_channels 9                          DiffHarmony
      refiner/       stage-2 UNet2DCustom, in_channels 3/4/7                      DiffHarmony
      empty_prompt_embeds.safetensors  optional: key "prompt_embeds", (1, 77, D); when present,
                                       tokenizer/ and text_encoder/ are neither needed nor loaded
"""

from __future__ import annotations

TOKENIZER = "tokenizer"
TEXT_ENCODER = "text_encoder"
SCHEDULER = "scheduler"
VAE = "vae"
UNET = "unet"
REFINER = "refiner"
EMPTY_PROMPT_EMBEDS = "empty_prompt_embeds.safetensors"
EMPTY_PROMPT_KEY = "prompt_embeds"
UNET_IN_CHANNELS = 9  # 4 noisy latent + 1 mask + 4 composite latent
# vae/config.json's `_class_name` of DiffHarmony++'s Harmony-VAE (`condition_vae.py`).
CONDITION_VAE_CLASS_NAME = "ConditionVAE"


class ModelDirError(ValueError):
    """The model directory cannot be used as it is; the message says why."""


class UnsafePickleError(ModelDirError):
    """A pickled checkpoint was found and pickles were not allowed."""


def describe_error(error: BaseException) -> str:
    """An exception as one line: its root cause's message (the libraries wrap the reason, a
    truncated archive or a refused pickle global, in a generic "unable to load")."""
    while (cause := error.__cause__ or error.__context__) is not None:
        error = cause
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
