"""FID and Inception Score: torch-fidelity's Inception, float64 running statistics, cached reference statistics."""
from ddpm_lightning.metrics.fid import FeatureStats, RunningFeatureStats, frechet_distance
from ddpm_lightning.metrics.fid_is import compute_fid_is, sampler_tag
from ddpm_lightning.metrics.inception import (
    INCEPTION_URL, InceptionFeatures, build_inception, resolve_inception_weights,
)
from ddpm_lightning.metrics.inception_score import RunningInceptionScore
from ddpm_lightning.metrics.reference_stats import cached_feature_stats, dataset_feature_stats, reference_stats

__all__ = [
    "FeatureStats", "RunningFeatureStats", "frechet_distance", "compute_fid_is", "sampler_tag", "INCEPTION_URL",
    "InceptionFeatures", "build_inception", "resolve_inception_weights", "RunningInceptionScore",
    "cached_feature_stats", "dataset_feature_stats", "reference_stats",
]
