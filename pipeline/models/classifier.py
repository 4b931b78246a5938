"""DiffHarmony++'s harmony classifier (HumanHarmony selection): how unharmonious an image looks.

Enters: images as the pipeline scores them, (B, 3, 256, 256) on the uint8 scale (0-255), already
resized from the written pixels as the official script resizes its input (PIL bilinear,
antialiased: `imaging.eval_resize`); the classifier's weights, a folder (path or URI) holding
one state-dict file, or a local file.
Leaves: (B,) float64 probabilities that the image is unharmonious (softmax, class 1), on the
images' device.

The official `scripts/misc/classify_cand_gen_data.py` runs torchvision's `resnet50()` with `fc`
replaced by `Linear(2048, 2)` on `Resize((256, 256), bilinear, antialias) -> ToTensor ->
Normalize(ImageNet mean, std)`, and keeps per real image the candidate with the highest class-1
probability. torchvision's compiled operators do not load next to the CPU build of torch this
project pins, so `ResNet50` below is our own module with torchvision's structure and parameter
names (`conv1`, `bn1`, `layer1`-`layer4` of `Bottleneck`s with `conv1..3`, `bn1..3`,
`downsample.0/.1`, `fc`): the released `model_state_dict.pth` loads into it strictly. Weights are
read from safetensors, or from a pickle only when pickles are allowed, and then with
`torch.load(weights_only=True)`, as every checkpoint of the pipeline.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.cache import MANIFEST, is_remote, read_manifest, resolve_model_dir
from pipeline.models.layout import ModelDirError, UnsafePickleError, describe_error

# The official script's input: 256 x 256, ImageNet statistics.
INPUT_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNHARMONIOUS = 1  # class index of "unharmonious"
# The release's file name first, then any other state-dict file.
OFFICIAL_FILE = "model_state_dict.pth"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


class ClassifierError(ModelDirError):
    """The classifier's weights cannot be used; the message says why."""


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's `resnet50(num_classes=...)`: same module tree, same state-dict keys."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        layers = []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(in_channels, width, stride if i == 0 else 1))
                in_channels = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized -> logits (B, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _weights_file(folder: Path, allow_unsafe_pickle: bool) -> Path:
    """The folder's one state-dict file: safetensors first, then the release's pickle."""
    names = sorted(os.listdir(folder))
    safe = [n for n in names if n.endswith(SAFE_SUFFIXES)]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if len(safe) > 1 or (not safe and len(pickles) > 1 and OFFICIAL_FILE not in pickles):
        found = ", ".join(safe if len(safe) > 1 else pickles)
        raise ClassifierError(f"{folder}: several weight files ({found}); keep one")
    if safe:
        return folder / safe[0]
    if pickles:
        return folder / (OFFICIAL_FILE if OFFICIAL_FILE in pickles else pickles[0])
    raise ClassifierError(
        f"{folder}: no classifier weights ({OFFICIAL_FILE} or a .safetensors state dict)"
    )


def load_state_dict_file(path: Path, allow_unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a pickle read with `weights_only=True` when
    pickles are allowed."""
    if path.name.endswith(SAFE_SUFFIXES):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise ClassifierError(f"{path}: unreadable ({describe_error(error)})") from None
    if not allow_unsafe_pickle:
        raise UnsafePickleError(
            f"{path}: pickled checkpoint (loading a pickle can run code); convert it to "
            "safetensors, or allow pickles (--allow-unsafe-pickle) if you trust it"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ClassifierError(f"{path}: cannot read the pickle ({describe_error(error)})") from None
    if not isinstance(state, dict):
        raise ClassifierError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


class HarmonyClassifier:
    """The released classifier on one device: `unharmony_prob(images)` per image."""

    def __init__(self, model: ResNet50, fingerprint: str, device: torch.device) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.fingerprint = fingerprint
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(
        cls,
        location: str,
        *,
        device: torch.device,
        allow_unsafe_pickle: bool = False,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> HarmonyClassifier:
        """From a folder (path or URI; remote folders through the node cache) or a local file.

        The state dict must fit `ResNet50(num_classes=2)` exactly: a missing, surplus or
        mis-shaped tensor is a `ClassifierError` naming it.
        """
        if not is_remote(location) and Path(location).expanduser().is_file():
            path = Path(location).expanduser()
        else:
            try:
                folder = resolve_model_dir(
                    location, cache_dir=cache_dir, storage_options=storage_options
                )
            except ModelDirError as error:
                raise ClassifierError(f"--classifier {location}: {error}") from None
            path = _weights_file(folder, allow_unsafe_pickle)
        state = load_state_dict_file(path, allow_unsafe_pickle)
        model = ResNet50(num_classes=2)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ClassifierError(
                f"{path}: not a ResNet-50 with a 2-class fc ({describe_error(error)})"
            ) from None
        return cls(model, _sha256(path), device)

    @torch.inference_mode()
    def unharmony_prob(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) uint8-valued (any float dtype) -> (B,) float64 P(unharmonious).

        As the official transform: ToTensor's float32 division by 255, then Normalize.
        """
        x = images.to(self.device, torch.float32) / 255.0
        x = (x - self.mean) / self.std
        logits = self.model(x)  # (B, 2)
        return F.softmax(logits, dim=-1)[:, UNHARMONIOUS].double()


def _sha256(path: Path) -> str:
    """The weights' sha256 (the node cache's manifest has it for remote folders)."""
    if (path.parent / MANIFEST).is_file():
        entry = read_manifest(path.parent).get(path.name)
        if entry:
            return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
