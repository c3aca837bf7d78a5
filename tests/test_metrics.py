"""FID and IS: float64 statistics against scipy and torch-fidelity, the Inception weights path offline, cached
reference statistics, and sharded evaluation that gives the same numbers on 1 and 2 processes."""

import os
from unittest import mock
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from ddpm_lightning.data import DigitsDataModule
from ddpm_lightning.data.tensor_dataset import TensorImageDataset
from ddpm_lightning.metrics import (
    INCEPTION_URL, FeatureStats, RunningFeatureStats, RunningInceptionScore, build_inception, compute_fid_is,
    dataset_feature_stats, frechet_distance, reference_stats, sampler_tag,
)
from ddpm_lightning.metrics import inception
from ddpm_lightning.metrics.distributed import rank_and_world_size, shard
from ddpm_lightning.metrics.inception import default_weights_path, extract_features
from ddpm_lightning.metrics.inception_score import split_of
from ddpm_lightning.metrics.reference_stats import reference_key
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.sampling import generate_uint8


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the ops here are small, and on 2 shared cores a second thread costs more than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StandInFeatures(nn.Module):
    """The feature-extractor protocol in miniature: pooled pixels through fixed random maps, no weights file."""

    num_features = 12
    num_classes = 10
    cache_name = "stand-in-12"

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("to_features", torch.randn(16, 12, generator=generator))
        self.register_buffer("to_logits", torch.randn(12, 10, generator=generator))
        self.images_seen = 0

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images_seen += len(images)
        x = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True) / 127.5 - 1, 4).flatten(1)
        features = torch.tanh(x @ self.to_features)
        return features, 3 * features @ self.to_logits


def digits(n=None):
    """uint8 [N, 1, 8, 8] digits, no download."""
    return DigitsDataModule(image_size=8).build_train_dataset().images[:n]


def tiny_module():
    return DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=25)


# ---------------------------------------------------------------------------------------------- FID arithmetic
def scipy_fid(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm), the reference arithmetic."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = scipy_linalg.sqrtm(sigma1.dot(sigma2))
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_running_stats_are_numpys_mean_and_cov_and_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24)) + 0.5
    b = rng.normal(size=(400, 24)) * 1.5 + rng.normal(size=24)
    stats = []
    for features in (a, b):
        running = RunningFeatureStats(24)
        for chunk in np.array_split(features, 7):  # uneven batches
            running.update(torch.from_numpy(chunk))
        stats.append(running.compute())
        np.testing.assert_allclose(stats[-1].mu, features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats[-1].sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
        assert stats[-1].count == len(features) and stats[-1].sigma.dtype == np.float64
    fid = frechet_distance(*stats)
    assert fid == pytest.approx(scipy_fid(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma), rel=1e-9)
    as_dicts = [{"mu": s.mu, "sigma": s.sigma} for s in stats]
    assert fid == pytest.approx(fid_statistics_to_metric(*as_dicts, verbose=False)["frechet_inception_distance"], rel=1e-9)
    assert frechet_distance(stats[0], stats[0]) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_diagonal_gaussians_is_closed_form():
    # N(m1, diag(s1)) vs N(m2, diag(s2)): |m1 - m2|^2 + sum (sqrt s1 - sqrt s2)^2.
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    fid = frechet_distance(FeatureStats(m1, np.diag(s1), 0), FeatureStats(m2, np.diag(s2), 0))
    assert fid == pytest.approx(5.0 + 1.0 + 0.0 + 4.0, rel=1e-12)
    with pytest.raises(ValueError, match="different feature extractors"):
        frechet_distance(FeatureStats(m1, np.diag(s1), 0), FeatureStats(m1[:2], np.diag(s1[:2]), 0))


def test_feature_stats_round_trip_and_read_pytorch_fid_files(tmp_path):
    stats = FeatureStats(np.arange(3.0), np.eye(3) * 2, 7)
    stats.save(tmp_path / "a.npz")
    loaded = FeatureStats.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 7 and not list(tmp_path.glob("*.partial"))
    np.savez(tmp_path / "ttur.npz", mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32))
    assert FeatureStats.load(tmp_path / "ttur.npz").mu.dtype == np.float64
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no mu and sigma"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_fid_of_a_set_against_itself_is_zero_and_not_of_another():
    extractor = StandInFeatures()
    images = digits()
    reference = dataset_feature_stats(TensorImageDataset(images, torch.zeros(len(images))), extractor, batch_size=300)
    same = compute_fid_is(images.permute(0, 2, 3, 1), reference, extractor, batch_size=128, is_splits=5)
    assert same["fid"] == pytest.approx(0.0, abs=1e-9)
    brighter = (images.int() + 60).clamp(max=255).to(torch.uint8).permute(0, 2, 3, 1)
    assert compute_fid_is(brighter, reference, extractor)["fid"] > 0.05
    with pytest.raises(ValueError, match="another extractor"):
        compute_fid_is(brighter, FeatureStats(np.zeros(3), np.eye(3), 0), extractor)
    with pytest.raises(ValueError, match="uint8"):
        compute_fid_is(brighter.float(), reference, extractor)


# ----------------------------------------------------------------------------------------------- Inception Score
def test_split_of_matches_improved_gan_chunk_boundaries():
    for num_samples in (7, 10, 103):
        for splits in (1, 3, 7):
            expected = torch.cat([torch.full(((g + 1) * num_samples // splits - g * num_samples // splits,), g)
                                  for g in range(splits)])
            assert torch.equal(split_of(torch.arange(num_samples), num_samples, splits), expected)


def test_inception_score_matches_torch_fidelity_and_closed_forms():
    logits = torch.randn(103, 10, generator=torch.Generator().manual_seed(0)) * 3
    metric = RunningInceptionScore(10, 103, splits=10)
    order = torch.randperm(103, generator=torch.Generator().manual_seed(1))
    for chunk in order.split(17):  # out of order, in uneven batches: the index decides the split
        metric.update(logits[chunk], chunk)
    mean, std = metric.compute()
    reference = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-8)

    # Confident, balanced predictions over K classes score K; identical predictions score 1.
    confident = RunningInceptionScore(10, 100, splits=2)
    confident.update(60.0 * F.one_hot(torch.arange(100) % 10, 10).float(), torch.arange(100))
    assert confident.compute() == pytest.approx((10.0, 0.0), abs=1e-9)
    uniform = RunningInceptionScore(10, 20, splits=4)
    uniform.update(torch.randn(1, 10).expand(20, 10), torch.arange(20))
    assert uniform.compute() == pytest.approx((1.0, 0.0), abs=1e-12)

    incomplete = RunningInceptionScore(10, 20, splits=4)
    incomplete.update(torch.randn(5, 10), torch.arange(5))
    with pytest.raises(ValueError, match="but 5 were added"):
        incomplete.compute()
    with pytest.raises(ValueError, match="splits must be in"):
        RunningInceptionScore(10, 5, splits=6)


def test_sampler_tag_names_the_settings():
    assert sampler_tag("ddpm", "100", 0.0) == "ddpm_100_skip0.0"
    assert sampler_tag("ddim", "ddim50", 0.1, eta=0.5) == "ddim_ddim50_eta0.5_skip0.1"
    assert sampler_tag("ddpm", None, 0.0) == "ddpm_full_skip0.0"


# ------------------------------------------------------------------------------------- Inception weights, offline
@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception architecture with random weights, saved as a weights file: the real path, offline."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            # He init keeps activations alive through the ~90 layers (PyTorch's default shrinks them to 1e-8).
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_path_runs_torch_fidelitys_network(random_inception_weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = build_inception(random_inception_weights)
    gray = digits(2)
    features, logits = extract_features(net, gray)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and features.std() > 0

    # One channel is repeated to RGB, and the resize is TensorFlow 1's bilinear without antialias: torchmetrics
    # gives the same features only with antialias=False, not with its antialiased default.
    rgb = gray.expand(-1, 3, -1, -1)
    kwargs = dict(name="inception-v3-compat", features_list=["2048"],
                  feature_extractor_weights_path=str(random_inception_weights))
    with torch.no_grad():
        torch.testing.assert_close(NoTrainInceptionV3(antialias=False, **kwargs)(rgb), features)
        antialiased = NoTrainInceptionV3(antialias=True, **kwargs)(rgb)
    assert (antialiased - features).abs().max() > 1e-3 * features.abs().max()

    net.train()
    assert not net.training  # a trainer's .train() leaves the batch-norm statistics alone


def test_missing_weights_file_names_the_option_and_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_weights: no file at") as info:
        build_inception(tmp_path / "missing.pth")
    assert INCEPTION_URL in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="is not a torch-fidelity Inception-v3 weights file"):
        build_inception(tmp_path / "garbage.pth")


def test_offline_without_a_file_says_where_to_get_one(tmp_path, monkeypatch, random_inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_weights_path().is_relative_to(tmp_path)

    def offline(url, dst, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as info:
        build_inception()
    message = str(info.value)
    assert INCEPTION_URL in message and "inception_weights" in message and "name resolution" in message
    assert "\n" not in message
    # Once the file is in torch.hub's cache (as after a first download), it is used without the network.
    default_weights_path().parent.mkdir(parents=True, exist_ok=True)
    os.symlink(random_inception_weights, default_weights_path())
    assert isinstance(build_inception(), inception.InceptionFeatures)


# ------------------------------------------------------------------------------------------ reference statistics
def test_reference_stats_are_computed_once_and_reused(tmp_path):
    extractor = StandInFeatures()
    datamodule = DigitsDataModule(image_size=8)
    datamodule.setup("fit")
    first = reference_stats(datamodule, extractor, cache_dir=tmp_path)
    # The whole training split, before the validation hold-out.
    assert first.count == 1797 and extractor.images_seen == 1797
    features, _ = extractor(digits())
    np.testing.assert_allclose(first.mu, features.double().mean(0).numpy(), rtol=1e-6)
    (cached,) = tmp_path.glob("*.npz")
    assert cached.name.startswith("DigitsDataModule-train-8px-stand-in-12-")

    fresh = DigitsDataModule(image_size=8)  # a later run: the data must not be touched
    fresh.build_train_dataset = lambda: pytest.fail("the cached statistics were recomputed")
    second = reference_stats(fresh, extractor, cache_dir=tmp_path)
    assert extractor.images_seen == 1797 + 1797  # only the direct call above
    np.testing.assert_array_equal(second.sigma, first.sigma)

    keys = {reference_key(DigitsDataModule(image_size=8), "train", "stand-in-12"),
            reference_key(DigitsDataModule(image_size=8, batch_size=7, num_val_samples=3), "train", "stand-in-12"),
            reference_key(DigitsDataModule(image_size=16), "train", "stand-in-12"),
            reference_key(DigitsDataModule(image_size=8), "train", "inception-v3-compat-pool3"),
            reference_key(DigitsDataModule(image_size=8), "train", "stand-in-12", num_images=100)}
    assert len(keys) == 4  # loader settings do not change the key; size, extractor and image count do
    with pytest.raises(ValueError, match="unknown reference split 'val'"):
        reference_key(datamodule, "val", "stand-in-12")


# -------------------------------------------------------------------------------------- sharding over processes
NUM_SAMPLES = 12


def evaluate_on_this_rank(tmp_path):
    """What every rank runs: reference statistics, this rank's images, and the synced FID / IS."""
    module = tiny_module()
    module.load_state_dict(torch.load(tmp_path / "module.pt"))
    extractor = StandInFeatures()
    rank, world_size = rank_and_world_size()
    reference = reference_stats(DigitsDataModule(image_size=8), extractor, cache_dir=tmp_path / f"stats{world_size}")
    images, _ = generate_uint8(module, shard(NUM_SAMPLES, rank, world_size), seed=3, batch_size=4, respacing="5")
    result = compute_fid_is(module, reference, extractor, NUM_SAMPLES, seed=3, batch_size=4, is_splits=3, respacing="5")
    return {"images": images, "reference": reference, **result}


def _worker(rank, world_size, tmp_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=rank, world_size=world_size)
    try:
        torch.save(evaluate_on_this_rank(tmp_path), tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_same_images_and_numbers_as_one(tmp_path):
    torch.manual_seed(0)
    module = tiny_module()
    torch.save(module.state_dict(), tmp_path / "module.pt")
    single = evaluate_on_this_rank(tmp_path)
    # The metric of the images themselves, as `ddpm evaluate` would compute it from samples.npz.
    extractor = StandInFeatures()
    from_images = compute_fid_is(single["images"], single["reference"], extractor, batch_size=5, is_splits=3)
    # Features are float32, so other batch sizes move them by rounding only.
    assert from_images == pytest.approx({k: single[k] for k in ("fid", "is_mean", "is_std")}, rel=1e-6)

    mp.spawn(_worker, args=(2, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(torch.cat([r["images"] for r in ranks]), single["images"])
    for result in ranks:
        np.testing.assert_allclose(result["reference"].sigma, single["reference"].sigma, rtol=1e-10, atol=1e-13)
        assert result["reference"].count == single["reference"].count == 1797
        for name in ("fid", "is_mean", "is_std"):
            assert result[name] == pytest.approx(single[name], rel=1e-6), name
