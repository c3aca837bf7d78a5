"""Networks: the DDPM / improved-DDPM UNet, its presets and checkpoint import."""

from .import_weights import from_hub, import_weights
from .presets import PRESETS, build_unet
from .unet import UNet

__all__ = ["PRESETS", "UNet", "build_unet", "from_hub", "import_weights"]
