"""The harmony classifier: torchvision's ResNet-50 (where torchvision imports), transformers'
ResNet-50 (always), the official preprocessing, strict and safe loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.random_model import harmony_classifier_state
from pipeline.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifierError,
    HarmonyClassifier,
    ResNet50,
)
from pipeline.models.layout import UnsafePickleError
from pipeline.score import to_eval_scale


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return harmony_classifier_state(seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path_factory.mktemp("release") / "harmony_classifier"
    folder.mkdir()
    torch.save(state, folder / "model_state_dict.pth")
    return folder


def _normalized(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(
        torch.rand(batch, 3, 16, 16, generator=generator), size=256, mode="bilinear"
    )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (images - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_same_keys_and_outputs_as_torchvision_resnet50(state: dict[str, torch.Tensor]) -> None:
    """The official script's model. torchvision's compiled operators do not load next to the CPU
    torch this project pins, so this runs where torchvision imports (the GPU nodes' image)."""
    torchvision = pytest.importorskip(
        "torchvision", reason="torchvision does not import next to this torch build"
    )
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Linear(reference.fc.in_features, 2)
    reference.load_state_dict(state, strict=True)  # the state dict we load, theirs too
    ours = ResNet50(num_classes=2)
    ours.load_state_dict(state, strict=True)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    x = _normalized(2, 1)
    with torch.inference_mode():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), atol=1e-5, rtol=0)


# torchvision 0.29.1's `resnet50()` with `fc = Linear(2048, 2)` (torch 2.14.1, CPU, fp32), the
# state of `harmony_classifier_state(seed=0)` loaded strictly, on `_normalized(2, 1)`: recorded
# once in a throwaway venv, since torchvision does not import here. Ours gave the same bits.
TORCHVISION_LOGITS = [
    [-0.6723637580871582, 0.6149120330810547],
    [-1.3861908912658691, -0.0030584335327148438],
]


def test_same_outputs_as_torchvision_recorded(state: dict[str, torch.Tensor]) -> None:
    """torchvision's own logits for these weights and inputs, recorded (see above)."""
    ours = ResNet50(num_classes=2).eval()
    ours.load_state_dict(state, strict=True)
    with torch.inference_mode():
        logits = ours(_normalized(2, 1))
    expected = torch.tensor(TORCHVISION_LOGITS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.softmax(-1), expected.softmax(-1), atol=1e-6, rtol=0)


def _to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's names -> transformers' ResNetForImageClassification names."""
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("conv1", "bn1"):
            kind = "convolution" if parts[0] == "conv1" else "normalization"
            mapped[f"resnet.embedder.embedder.{kind}.{'.'.join(parts[1:])}"] = value
        elif parts[0] == "fc":
            mapped[f"classifier.1.{parts[1]}"] = value
        else:
            stage, block = int(parts[0].removeprefix("layer")) - 1, parts[1]
            prefix = f"resnet.encoder.stages.{stage}.layers.{block}"
            if parts[2] == "downsample":
                kind = "convolution" if parts[3] == "0" else "normalization"
                mapped[f"{prefix}.shortcut.{kind}.{'.'.join(parts[4:])}"] = value
            else:
                index = int(parts[2][-1]) - 1
                kind = "convolution" if parts[2].startswith("conv") else "normalization"
                mapped[f"{prefix}.layer.{index}.{kind}.{'.'.join(parts[3:])}"] = value
    return mapped


def test_same_outputs_as_transformers_resnet50(state: dict[str, torch.Tensor]) -> None:
    """An outside ResNet-50 that imports here: transformers' (v1.5, stride on the 3x3 conv, as
    torchvision's), its tensors renamed one to one."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
        layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
        downsample_in_bottleneck=False, num_labels=2,
    )  # fmt: skip
    reference = ResNetForImageClassification(config).eval()
    reference.load_state_dict(_to_transformers(state), strict=True)
    ours = ResNet50(num_classes=2).eval()
    ours.load_state_dict(state, strict=True)
    x = _normalized(3, 2)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reference(x).logits, atol=1e-5, rtol=0)


def test_probability_is_the_official_transform_chain(release: Path) -> None:
    """PIL image -> Resize((256, 256), bilinear, antialias) -> ToTensor -> Normalize -> softmax
    [:, 1], written out, against the pipeline's path: the written pixels resized for scoring
    (`to_eval_scale`), then `unharmony_prob`."""
    classifier = HarmonyClassifier.load(
        str(release), device=torch.device("cpu"), allow_unsafe_pickle=True
    )
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((300, 410), (180, 180)):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        images.append(np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)))
    expected, resized_pixels = [], []
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image in images:
        resized = Image.fromarray(image).resize((256, 256), Image.BILINEAR)  # what Resize does
        resized_pixels.append(np.array(resized))
        tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)  # ToTensor
        tensor = (tensor - mean) / std  # Normalize
        with torch.inference_mode():
            logits = classifier.model(tensor[None])
        expected.append(torch.softmax(logits, dim=-1)[0, 1].item())
    as_written = [torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255 for image in images]
    scored = to_eval_scale(as_written)
    # The very pixels the official script feeds the network...
    assert np.array_equal(scored.permute(0, 2, 3, 1).numpy(), np.stack(resized_pixels))
    ours = classifier.unharmony_prob(scored)
    assert ours.dtype == torch.float64 and ours.shape == (2,)
    # ... and the same probabilities, up to batched convolutions rounding differently (~1e-6).
    assert ours.tolist() == pytest.approx(expected, abs=1e-5)
    assert 0.02 < min(expected) and max(expected) < 0.98  # not saturated: the test can see


def test_pickles_are_refused_unless_allowed(release: Path) -> None:
    with pytest.raises(UnsafePickleError, match="allow-unsafe-pickle"):
        HarmonyClassifier.load(str(release), device=torch.device("cpu"))
    loaded = HarmonyClassifier.load(
        str(release / "model_state_dict.pth"), device=torch.device("cpu"), allow_unsafe_pickle=True
    )
    assert len(loaded.fingerprint) == 64


def test_safetensors_load_without_pickles_and_fingerprint_the_file(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    first = HarmonyClassifier.load(str(tmp_path), device=torch.device("cpu"))
    assert (
        first.fingerprint
        == HarmonyClassifier.load(
            str(tmp_path / "model.safetensors"), device=torch.device("cpu")
        ).fingerprint
    )
    changed = dict(state)
    changed["fc.bias"] = changed["fc.bias"] + 1
    other = tmp_path / "other"
    other.mkdir()
    save_file(changed, str(other / "model.safetensors"))
    assert HarmonyClassifier.load(str(other), device=torch.device("cpu")).fingerprint != (
        first.fingerprint
    )


def test_a_state_dict_that_does_not_fit_is_named(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    from safetensors.torch import save_file

    cases = {
        "missing": {k: v for k, v in state.items() if k != "layer3.2.bn2.running_var"},
        "surplus": {**state, "extra.weight": torch.zeros(1)},
        "thousand classes": {
            **state,
            "fc.weight": torch.zeros(1000, 2048),
            "fc.bias": torch.zeros(1000),
        },
    }
    for name, tensors in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(ClassifierError, match="not a ResNet-50 with a 2-class fc"):
            HarmonyClassifier.load(str(folder), device=torch.device("cpu"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no weights here")
    with pytest.raises(ClassifierError, match="no classifier weights"):
        HarmonyClassifier.load(str(empty), device=torch.device("cpu"))


def test_remote_folder_goes_through_the_node_cache(tmp_path: Path, release: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file(
        "/classifiers/hc/model_state_dict.pth", (release / "model_state_dict.pth").read_bytes()
    )
    remote = HarmonyClassifier.load(
        "memory:///classifiers/hc", device=torch.device("cpu"), allow_unsafe_pickle=True,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    local = HarmonyClassifier.load(
        str(release), device=torch.device("cpu"), allow_unsafe_pickle=True
    )
    assert remote.fingerprint == local.fingerprint
    fs.rm("/classifiers/hc", recursive=True)
