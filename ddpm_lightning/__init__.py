"""ddpm-lightning: DDPM and Improved DDPM on PyTorch Lightning."""
__version__ = "0.1.0"
