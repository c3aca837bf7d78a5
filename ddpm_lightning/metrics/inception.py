"""The Inception-v3 of FID and IS: torch-fidelity's TensorFlow-exact network, its weights file, and its input.

How images reach the network, as in the reference implementations (TTUR's TensorFlow FID, improved-gan's IS,
guided-diffusion's evaluator, all on the 2015-12-05 TensorFlow Inception graph):

- Network: torch-fidelity's FeatureExtractorInceptionV3, the PyTorch port of that graph; torchmetrics'
  NoTrainInceptionV3 subclasses the same class. One pass gives the pool3 features (2048, for FID) and the
  fc logits without their bias ("logits_unbiased", 1008 classes, what improved-gan's IS takes the softmax of).
- Input: uint8 [N, C, H, W] in 0..255; a single channel is repeated to RGB. Generated images reach uint8
  through sampling.to_uint8_nhwc (improved-diffusion's truncating map from [-1, 1]) and real images come
  uint8 from the DataModules, so both sides are quantised alike. torchmetrics' `normalize=True` (floats in
  [0, 1]) is never used.
- Resize to 299x299: torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, TensorFlow 1's bilinear
  (align_corners=False, no half-pixel centres, no antialias), bit-exact on the CPU with the graph's
  ResizeBilinear. torchmetrics' NoTrainInceptionV3 defaults to antialias=True (torch's antialiased
  bilinear) and pytorch-fid uses torch's plain bilinear; both move FID, so we call torch-fidelity's forward.
- Then (x - 128) / 128 as in the graph, float32 inside the network; the statistics are float64 (fid.py).

Weights: torch-fidelity's file (INCEPTION_URL), passed as `inception_weights`. pytorch-fid's
pt_inception-2015-12-05-6726825d.pth carries the same sha256 prefix in its name and torchvision's module names,
so it should load too (only torch-fidelity's layout is tested here). Without a path we use torch.hub's cache,
where torchmetrics and torch-fidelity also keep the file, and download it there on first use.

The feature-extractor protocol that the rest of ddpm_lightning.metrics relies on, so that tests can use a
small stand-in: forward(uint8 [N, C, H, W]) -> (features [N, num_features], logits [N, num_classes]), with
integer attributes num_features and num_classes and a string cache_name that names the feature space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.hub import download_url_to_file
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

INCEPTION_URL = URL_INCEPTION_V3


def default_weights_path() -> Path:
    """Where torch.hub (and so torchmetrics and torch-fidelity) caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(INCEPTION_URL).path).name


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def resolve_inception_weights(inception_weights: Optional[Union[str, Path]] = None) -> Path:
    """The weights file to load: the given path, else torch.hub's cached copy, downloaded on first use."""
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"inception_weights: no file at '{path}'; download {INCEPTION_URL} and pass its path"
            )
        return path
    path = default_weights_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Written to a temporary file and renamed, so DDP ranks downloading at once do not clash.
        download_url_to_file(INCEPTION_URL, str(path), progress=True)
    except (URLError, OSError) as err:  # no network, DNS, HTTP errors and timeouts are all OSErrors
        raise FileNotFoundError(
            f"no Inception weights at '{path}' and downloading {INCEPTION_URL} failed ({_one_line(err)}); "
            f"fetch that file where there is internet and pass its path as inception_weights"
        ) from err
    return path


class InceptionFeatures(FeatureExtractorInceptionV3):
    """pool3 features (2048) and unbiased logits (1008) of uint8 images in one pass; never leaves eval mode."""

    num_features = 2048
    num_classes = 1008
    cache_name = "inception-v3-compat-pool3"

    def __init__(self, weights_path: Union[str, Path]):
        try:
            super().__init__("inception-v3-compat", ["2048", "logits_unbiased"],
                             feature_extractor_weights_path=str(weights_path))
        except Exception as err:  # torch.load's unpickling errors or load_state_dict's key mismatch
            raise ValueError(
                f"inception_weights: '{weights_path}' is not a torch-fidelity Inception-v3 weights file "
                f"({_one_line(err)[:200]})"
            ) from err

    def train(self, mode: bool = True) -> "InceptionFeatures":
        # Batch-norm statistics are the TensorFlow graph's; a trainer's .train() must not touch them.
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 [N, 1 or 3, H, W] -> (features [N, 2048], logits [N, 1008]), float32."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape)
            raise ValueError(f"Inception expects uint8 [N, 1 or 3, H, W] images, got {images.dtype} {shape}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features, logits = super().forward(images)
        return features, logits


def build_inception(inception_weights: Optional[Union[str, Path]] = None) -> InceptionFeatures:
    """The FID/IS Inception with the given weights file, or torch.hub's copy (downloaded on first use)."""
    return InceptionFeatures(resolve_inception_weights(inception_weights))


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one that has neither)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(feature_extractor: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(features, logits) of uint8 [N, C, H, W] images, computed on the extractor's device in float32."""
    device = module_device(feature_extractor)
    # Inside a mixed-precision trainer hook, autocast would run Inception in half precision.
    with torch.autocast(device.type, enabled=False):
        return feature_extractor(images.to(device))
