"""Does a digit classifier recognise the quickstart's samples?

Each sample is average-pooled back to the digits' 8x8 and compared with scikit-learn's 1,797 real
digits. Recognised = it lies as close to a real digit as real digits lie to each other (within the
99th percentile of their nearest-neighbour distances) and at least 4 of its 5 nearest real digits
agree on the label. A confidence threshold alone would not do: classifiers are confident on noise.
    python -m ddpm_lightning.tools.check_digits runs/quickstart/samples/samples.npz
"""

from __future__ import annotations

import sys

import numpy as np


def nearest_real_digits(features: np.ndarray, k: int = 5):
    """(distances [N, k], labels [N, k]) of the k nearest real digits, and the 99th-percentile
    nearest-neighbour distance among the real digits themselves."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import NearestNeighbors

    digits = load_digits()
    index = NearestNeighbors(n_neighbors=k + 1).fit(digits.data)
    real_distances, _ = index.kneighbors(digits.data, n_neighbors=2)  # [:, 0] is the point itself
    threshold = float(np.quantile(real_distances[:, 1], 0.99))
    distances, neighbours = index.kneighbors(features, n_neighbors=k)
    return distances, digits.target[neighbours], threshold


def to_digits_features(samples_nhwc: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 1] with H a multiple of 8 -> [N, 64] on the digits' 0..16 scale."""
    n, h, w, _ = samples_nhwc.shape
    if h % 8 or w % 8:
        raise ValueError(f"samples of size {h}x{w} cannot be pooled to the digits' 8x8")
    x = samples_nhwc[..., 0].astype(np.float64).reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return x.reshape(n, 64) / 255.0 * 16.0


def recognition(samples_nhwc: np.ndarray) -> tuple[float, np.ndarray]:
    """(fraction recognised, count of recognised samples per digit)."""
    distances, labels, threshold = nearest_real_digits(to_digits_features(samples_nhwc))
    votes = np.array([np.bincount(row, minlength=10) for row in labels])
    recognised = (distances[:, 0] <= threshold) & (votes.max(1) >= 4)
    return float(recognised.mean()), np.bincount(votes.argmax(1)[recognised], minlength=10)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m ddpm_lightning.tools.check_digits SAMPLES.npz")
    samples = np.load(argv[0])["arr_0"]
    fraction, counts = recognition(samples)
    print(f"digit classifier: {fraction:.0%} of {len(samples)} samples recognised as digits; "
          f"per digit {counts.tolist()}")


if __name__ == "__main__":
    main()
