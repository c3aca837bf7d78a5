"""Sub-commands of `ddpm` that are not Trainer methods."""
