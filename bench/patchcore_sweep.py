"""PatchCore scoring variants on one dataset, from cached patch features: a research harness.

Extracts patch features once per (backbone, stages, size, neighbourhood) with the trainer's own
PatchEmbedder, caches them under --cache, then scores the calibration and test splits with
several memory-bank searches and image scores, without refitting the backbone. Each line: test
image AUROC, and recall / false-reject rate on test at the fpr:RATE threshold chosen on
calibration, exactly as `lineguard-train run --threshold fpr:RATE` would choose it.
`--seeds` repeats every variant with other coreset seeds: the noise floor a change must beat.
The `gauss` and `ensemble` variants also read each backbone stage's globally pooled features
(extracted once, cached beside the patch features).

    OMP_NUM_THREADS=2 .venv/bin/python bench/patchcore_sweep.py DATA --size 256 --stages 3,4 \
        --variants global,knn:3,reweight,position:2,gauss:45,ensemble:45 --seeds 0,1,2 --cache /tmp/features
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from lineguard.trainer.backbone import STAGES, EfficientNetLiteFeatures
from lineguard.trainer.calibrate import ThresholdMethod, choose_threshold
from lineguard.trainer.coreset import DEFAULT_MAX_CANDIDATES, CoresetSpec, greedy_coreset
from lineguard.trainer.data import discover_dataset, load_images, read_image
from lineguard.trainer.models.layers import ImageNetInput
from lineguard.trainer.models.patchcore import PatchCoreConfig, PatchEmbedder
from lineguard.trainer.onnx_features import extract_features

log = logging.getLogger("patchcore_sweep")


def _standardised(images: np.ndarray, mean: float = 128.0, std: float = 40.0) -> np.ndarray:
    """Each image's grey levels shifted and scaled to one mean and standard deviation (exposure-invariant input)."""
    x = images.astype(np.float32)
    mu, sigma = x.mean(axis=(1, 2, 3), keepdims=True), x.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    return ((x - mu) / sigma * std + mean).clip(0, 255).round().astype(np.uint8)


def features_of(
    data: Path, config: PatchCoreConfig, cache: Path, *, standardise: bool = False, flip: bool = False
) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """split -> (features (N, D, h, w) float32, labels (N,)); cached as float16 .npz.

    flip: features of each image mirrored left to right (the image is flipped, not the feature map).
    """
    key = f"{data.name}-{config.backbone}-{'_'.join(map(str, config.stages))}-{config.input_width}x{config.input_height}-n{config.neighbourhood}{'-std' if standardise else ''}{'-flip' if flip else ''}"
    path = cache / f"{key}.npz"
    if path.exists():
        with np.load(path) as saved:
            return {s: (torch.from_numpy(saved[f"{s}_x"].astype(np.float32)), saved[f"{s}_y"]) for s in SPLITS}
    dataset = discover_dataset(data)
    source = read_image(dataset.train[0].path).shape[:2]
    embedder = PatchEmbedder(config)
    out, arrays = {}, {}
    for split in SPLITS:
        samples = dataset.split(split)
        images = load_images(
            samples, height=config.input_height, width=config.input_width, channels=config.channels, source_size=source
        )
        if standardise:
            images = _standardised(images)
        if flip:
            images = np.ascontiguousarray(images[:, :, ::-1])
        started = time.perf_counter()
        features = extract_features(embedder, images)
        log.info("%s: %d images in %.1f s", split, len(images), time.perf_counter() - started)
        labels = np.array([s.label for s in samples])
        out[split] = (features, labels)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = out[split][0].numpy().astype(np.float16), labels
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return out


SPLITS = ("train", "calibration", "test")


class PooledStages(nn.Module):
    """uint8 frames to the global average of every backbone stage's map, concatenated.

    forward(images): (N, H, W, C) uint8 -> (N, sum of C_s) float32, stages 2..5 in order.
    """

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__()
        self.features = EfficientNetLiteFeatures(config.backbone, STAGES)
        self.input = ImageNetInput(config.channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.mean(dim=(2, 3)) for m in self.features(self.input(images))], dim=1)


def pooled_features_of(
    data: Path, config: PatchCoreConfig, cache: Path, *, standardise: bool = False
) -> dict[int, dict[str, np.ndarray]]:
    """stage -> split -> (N, C_s) float64 globally pooled features of that backbone stage; cached as .npz."""
    key = f"{data.name}-{config.backbone}-pooled-{config.input_width}x{config.input_height}{'-std' if standardise else ''}"
    path = cache / f"{key}.npz"
    if not path.exists():
        module = PooledStages(config)
        dataset = discover_dataset(data)
        source = read_image(dataset.train[0].path).shape[:2]
        arrays = {}
        for split in SPLITS:
            images = load_images(
                dataset.split(split),
                height=config.input_height,
                width=config.input_width,
                channels=config.channels,
                source_size=source,
            )
            arrays[split] = extract_features(module, _standardised(images) if standardise else images).numpy()
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, channels=np.array(module.features.channels), **arrays)
    with np.load(path) as saved:
        bounds = np.cumsum([0, *saved["channels"].tolist()])
        return {
            stage: {s: saved[s][:, bounds[i] : bounds[i + 1]].astype(np.float64) for s in SPLITS}
            for i, stage in enumerate(STAGES)
        }


def flat(features: torch.Tensor) -> torch.Tensor:
    n, d, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(n * h * w, d)


def grid_positions(n: int, h: int, w: int) -> torch.Tensor:
    """(n*h*w, 2) row, column of every patch in flat() order."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], 1).repeat(n, 1)


def coreset(patches: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    spec = CoresetSpec(target_size=size, seed=seed, max_candidates=max(DEFAULT_MAX_CANDIDATES, size))
    return greedy_coreset(patches, spec)


def nearest(features: torch.Tensor, bank: torch.Tensor, k: int = 1, bias: torch.Tensor | None = None) -> tuple:
    """Per image (h*w, k) nearest squared distances and indices into bank; bias (h*w, K) added before the min."""
    _, d, h, w = features.shape
    norms = (bank * bank).sum(1)
    dists, index = [], []
    for image in features:
        p = image.permute(1, 2, 0).reshape(h * w, d)
        sq = (p * p).sum(1, keepdim=True) - 2 * p @ bank.t() + norms
        if bias is not None:
            sq = sq + bias
        values, idx = sq.topk(k, dim=1, largest=False)
        dists.append(values.clamp(min=0).sqrt())
        index.append(idx)
    return torch.stack(dists), torch.stack(index)


def evaluate(name: str, scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], rate: float) -> dict:
    threshold = choose_threshold(scores["calibration"], labels["calibration"], ThresholdMethod("fpr", rate))
    test, y = scores["test"], labels["test"]
    result = {
        "variant": name,
        "cal_auroc": roc_auc_score(labels["calibration"], scores["calibration"]),
        "test_auroc": roc_auc_score(y, test),
        "recall": float(np.mean(test[y == 1] >= threshold)),
        "fpr": float(np.mean(test[y == 0] >= threshold)),
    }
    print(
        f"{name:<28} cal {result['cal_auroc']:.4f}  test {result['test_auroc']:.4f}  "
        f"recall {result['recall']:.3f}  fpr {result['fpr']:.3f}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--stages", default="3,4")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--neighbourhood", type=int, default=3)
    parser.add_argument("--bank", type=int, default=4096)
    parser.add_argument("--variants", default="global")
    parser.add_argument(
        "--seeds", default="0", help="coreset seeds, comma-separated: every variant runs once per seed (noise floor)"
    )
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lineguard-features"))
    parser.add_argument("--standardise", action="store_true", help="each image to grey mean 128, std 40 first")
    parser.add_argument(
        "--flip", action="store_true", help="also extract mirrored images' features (flip* variants use them)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = PatchCoreConfig(
        input_height=args.size,
        input_width=args.size,
        channels=1,
        backbone=args.backbone,
        stages=tuple(int(s) for s in args.stages.split(",")),
        neighbourhood=args.neighbourhood,
    )
    feats = features_of(args.data, config, args.cache, standardise=args.standardise)
    from variants import VARIANTS, use_seed  # beside this file; imports this module's helpers

    if args.flip:
        mirrored = features_of(args.data, config, args.cache, standardise=args.standardise, flip=True)
        feats.update({f"{s}_flip": mirrored[s] for s in SPLITS})
    if any(text.startswith(("gauss", "ensemble", "supervised")) for text in args.variants.split(",")):
        feats["pooled"] = pooled_features_of(args.data, config, args.cache, standardise=args.standardise)
    labels = {s: feats[s][1] for s in SPLITS}
    print(f"# {args.backbone} stages {args.stages} size {args.size} nb {args.neighbourhood} bank {args.bank}")
    for seed in (int(s) for s in args.seeds.split(",")):
        use_seed(seed)
        for text in args.variants.split(","):
            name, _, param = text.partition(":")
            started = time.perf_counter()
            scores = VARIANTS[name](feats, args.bank, param)
            evaluate(f"{text} seed {seed}", scores, labels, args.rate)
            log.info("  (%.1f s)", time.perf_counter() - started)


if __name__ == "__main__":
    main()
