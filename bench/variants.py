"""Scoring variants for bench/patchcore_sweep.py: name -> f(features, bank_size, param) -> {split: (N,) scores}."""

from __future__ import annotations

import math

import numpy as np
import torch
from patchcore_sweep import coreset, flat, grid_positions, nearest
from scipy.stats import spearmanr
from sklearn.covariance import LedoitWolf

SCORED = ("calibration", "test")


_BANKS: dict[tuple[int, int, int], torch.Tensor] = {}
_SEED = {"coreset": 0}  # set by patchcore_sweep.py --seeds through use_seed()


def use_seed(seed: int) -> None:
    """Seed every coreset the variants pick from now on (the projection and the first centre)."""
    _SEED["coreset"] = seed


def _coreset(patches: torch.Tensor, size: int) -> torch.Tensor:
    return coreset(patches, size, seed=_SEED["coreset"])


def _global_bank(feats, bank_size: int) -> torch.Tensor:
    key = (id(feats["train"][0]), bank_size, _SEED["coreset"])
    if key not in _BANKS:
        patches = flat(feats["train"][0])
        _BANKS[key] = patches[_coreset(patches, bank_size)].clone()
    return _BANKS[key]


def global_max(feats, bank_size, param):
    """Today's PatchCore: nearest distance to a global coreset, image score = max."""
    bank = _global_bank(feats, bank_size)
    return {s: nearest(feats[s][0], bank)[0][..., 0].amax(1).numpy() for s in SCORED}


def knn(feats, bank_size, param):
    """Patch score = mean distance to its k nearest bank entries; image score = max."""
    k = int(param or 3)
    bank = _global_bank(feats, bank_size)
    return {s: nearest(feats[s][0], bank, k)[0].mean(2).amax(1).numpy() for s in SCORED}


def topmean(feats, bank_size, param):
    """Image score = mean of the hottest `param` patches (nearest distance to a global coreset)."""
    count = int(param or 4)
    bank = _global_bank(feats, bank_size)
    return {s: nearest(feats[s][0], bank)[0][..., 0].topk(count, dim=1).values.mean(1).numpy() for s in SCORED}


def reweight(feats, bank_size, param):
    """PatchCore paper eq. 7: the max patch's score scaled by 1 - softmax weight of its nearest entry among b."""
    b = int(param or 9)
    bank = _global_bank(feats, bank_size)
    bank_norms = (bank * bank).sum(1)
    neighbours = ((bank_norms[:, None] - 2 * bank @ bank.t() + bank_norms[None]).topk(b, dim=1, largest=False)).indices
    out = {}
    for s in SCORED:
        features = feats[s][0]
        n, d, h, w = features.shape
        dist, idx = nearest(features, bank)
        scores = []
        for i in range(n):
            worst = int(dist[i, :, 0].argmax())
            patch = features[i].permute(1, 2, 0).reshape(h * w, d)[worst]
            m_star = int(idx[i, worst, 0])
            to_neighbours = (bank[neighbours[m_star]] - patch).norm(dim=1)  # includes m* itself first
            weight = 1 - torch.exp(to_neighbours[0]) / torch.exp(to_neighbours).sum()
            scores.append(float(weight * dist[i, worst, 0]))
        out[s] = np.array(scores)
    return out


def position_exact(feats, bank_size, param):
    """Upper bound: each patch against every training patch within R grid cells of its position (no coreset)."""
    radius = int(param or 1)
    train = feats["train"][0]
    _, d, h, w = train.shape
    out = {s: np.zeros(len(feats[s][0])) for s in SCORED}
    for s in SCORED:
        features = feats[s][0]
        best = torch.zeros(len(features), h, w)
        for r in range(h):
            for c in range(w):
                window = train[:, :, max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1]
                bank = window.permute(0, 2, 3, 1).reshape(-1, d)
                best[:, r, c] = torch.cdist(features[:, :, r, c], bank).amin(1)
        out[s] = best.flatten(1).amax(1).numpy()
    return out


def position(feats, bank_size, param):
    """Bank picked per block of positions (coreset each); a patch searches entries from within R cells."""
    radius_text, _, block_text = (param or "2").partition(":")
    radius, block = int(radius_text), int(block_text or 4)
    train = feats["train"][0]
    n_train, _, h, w = train.shape
    blocks_h, blocks_w = math.ceil(h / block), math.ceil(w / block)
    per_block = max(1, bank_size // (blocks_h * blocks_w))
    entries, positions = [], []
    for br in range(blocks_h):
        for bc in range(blocks_w):
            region = train[:, :, br * block : (br + 1) * block, bc * block : (bc + 1) * block]
            patches = flat(region)
            pos = grid_positions(n_train, region.shape[2], region.shape[3]) + torch.tensor([br * block, bc * block])
            chosen = _coreset(patches, per_block)
            entries.append(patches[chosen])
            positions.append(pos[chosen])
    bank, bank_pos = torch.cat(entries), torch.cat(positions)
    query = grid_positions(1, h, w)
    far = (query[:, None, :] - bank_pos[None]).abs().amax(2) > radius
    bias = far.float() * 1e6
    return {s: nearest(feats[s][0], bank, 1, bias)[0][..., 0].amax(1).numpy() for s in SCORED}


def posfeat(feats, bank_size, param):
    """Patch coordinates appended to the features, scaled so one cell costs `param` x the median NN distance / 8."""
    scale = float(param or 1.0)
    train = feats["train"][0]
    patches = flat(train)
    sample = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:2048]]
    typical = float(
        torch.cdist(sample, patches[:: max(1, len(patches) // 20000)]).topk(2, largest=False).values[:, 1].median()
    )
    unit = scale * typical / 8

    def with_pos(features):
        m, _, hh, ww = features.shape
        rows = torch.arange(hh).view(1, 1, hh, 1).expand(m, 1, hh, ww).float() * unit
        cols = torch.arange(ww).view(1, 1, 1, ww).expand(m, 1, hh, ww).float() * unit
        return torch.cat([features, rows, cols], 1)

    augmented = flat(with_pos(train))
    bank = augmented[_coreset(augmented, bank_size)].clone()
    return {s: nearest(with_pos(feats[s][0]), bank)[0][..., 0].amax(1).numpy() for s in SCORED}


def padim(feats, bank_size, param):
    """PaDiM: per-position Gaussian (features projected to `param` dims), Mahalanobis distance; image score = max."""
    dims = int(param or 64)
    train = feats["train"][0]
    n, d, h, w = train.shape
    generator = torch.Generator().manual_seed(0)
    keep = torch.randperm(d, generator=generator)[:dims]
    x = train[:, keep].permute(2, 3, 0, 1).reshape(h * w, n, dims).double()
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    cov = centred.transpose(1, 2) @ centred / (n - 1) + 0.01 * torch.eye(dims, dtype=torch.float64)
    inverse = torch.linalg.inv(cov)
    out = {}
    for s in SCORED:
        q = feats[s][0][:, keep].permute(2, 3, 0, 1).reshape(h * w, -1, dims).double() - mean
        md = torch.einsum("pnd,pde,pne->pn", q, inverse, q).clamp(min=0).sqrt()
        out[s] = md.amax(0).float().numpy()
    return out


def _flip_bank(feats, bank_size: int) -> torch.Tensor:
    """One coreset of bank_size over the training patches of each image and its mirror image."""
    key = (id(feats["train_flip"][0]), bank_size, _SEED["coreset"])
    if key not in _BANKS:
        patches = torch.cat([flat(feats["train"][0]), flat(feats["train_flip"][0])])
        _BANKS[key] = patches[_coreset(patches, bank_size)].clone()
    return _BANKS[key]


def _combined(feats, bank: torch.Tensor, how: str) -> dict[str, np.ndarray]:
    """Image score of each image and its mirror image against one bank, combined by how (none, mean, max)."""
    out = {}
    for s in SCORED:
        plain = nearest(feats[s][0], bank)[0][..., 0].amax(1)
        if how == "none":
            out[s] = plain.numpy()
            continue
        mirrored = nearest(feats[f"{s}_flip"][0], bank)[0][..., 0].amax(1)
        out[s] = (torch.maximum(plain, mirrored) if how == "max" else (plain + mirrored) / 2).numpy()
    return out


def fliptta(feats, bank_size, param):
    """Test-time flip: the image score combined (param mean or max) over the image and its mirror; global bank."""
    return _combined(feats, _global_bank(feats, bank_size), param or "mean")


def flipbank(feats, bank_size, param):
    """Bank from training images and their mirror images (same bank size); param none, mean or max for test-time flip."""
    return _combined(feats, _flip_bank(feats, bank_size), param or "none")


def _stages(param: str) -> list[int]:
    """'345' -> [3, 4, 5]; empty -> every pooled stage."""
    return [int(c) for c in param] if param else [2, 3, 4, 5]


def _gauss(feats, stages: list[int]) -> dict[str, np.ndarray]:
    """Sum over stages of the Mahalanobis distance to a Ledoit-Wolf Gaussian of the train pooled features."""
    out = {s: np.zeros(len(feats[s][1])) for s in SCORED}
    for stage in stages:
        pooled = feats["pooled"][stage]
        model = LedoitWolf().fit(pooled["train"])
        for s in SCORED:
            out[s] += np.sqrt(model.mahalanobis(pooled[s]))  # sklearn returns squared distances
    return out


def gauss(feats, bank_size, param):
    """Rippel et al. 2020: global-average-pooled stage features, one Ledoit-Wolf Gaussian per stage; param stages."""
    return _gauss(feats, _stages(param))


def _z(scores: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Scores normalised by the calibration-good scores' mean and std (as bench/ensemble_scores.py)."""
    good = scores["calibration"][labels == 0]
    return {s: (v - good.mean()) / (good.std() + 1e-12) for s, v in scores.items()}


def ensemble(feats, bank_size, param):
    """Today's PatchCore + weight x the Gaussian (param STAGES[:WEIGHT]), each z-normalised; prints correlations."""
    stages_text, _, weight_text = param.partition(":")
    weight = float(weight_text or 1.0)
    labels = feats["calibration"][1]
    patchcore = _z(global_max(feats, bank_size, ""), labels)
    gaussian = _z(_gauss(feats, _stages(stages_text)), labels)
    cal = (patchcore["calibration"], gaussian["calibration"])
    print(
        f"  correlation on calibration: pearson {np.corrcoef(*cal)[0, 1]:.3f}, spearman {spearmanr(*cal)[0]:.3f}; "
        f"good only {np.corrcoef(*(c[labels == 0] for c in cal))[0, 1]:.3f}, "
        f"defect only {np.corrcoef(*(c[labels == 1] for c in cal))[0, 1]:.3f}",
        flush=True,
    )
    return {s: patchcore[s] + weight * gaussian[s] for s in SCORED}


def _standardiser(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the training patches."""
    patches = flat(feats["train"][0])
    return patches.mean(0), patches.std(0) + 1e-6


def whiten(feats, bank_size, param):
    """Patch features standardised per channel (training patches' mean and std) before the coreset and search.

    param 'pca': full PCA whitening (Ledoit-Wolf shrunk covariance) instead of per-channel scaling.
    """
    patches = flat(feats["train"][0])
    mean, std = _standardiser(feats)
    if param == "pca":
        sub = patches[:: max(1, len(patches) // 50000)].double().numpy()
        cov = torch.from_numpy(LedoitWolf().fit(sub).covariance_)
        values, vectors = torch.linalg.eigh(cov)
        transform = (vectors / values.clamp(min=1e-9).sqrt()).float()
    else:
        transform = torch.diag(1 / std)

    def apply(features):
        n, _, h, w = features.shape
        x = (flat(features) - mean) @ transform
        return x.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    train = flat(apply(feats["train"][0]))
    bank = train[_coreset(train, bank_size)].clone()
    return {s: nearest(apply(feats[s][0]), bank)[0][..., 0].amax(1).numpy() for s in SCORED}


def smooth(feats, bank_size, param):
    """Image score = max of the patch-score map after a Gaussian blur of sigma `param` grid cells (paper: sigma 4 px)."""
    sigma = float(param or 1.0)
    bank = _global_bank(feats, bank_size)
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1).float() / sigma) ** 2)
    taps = taps / taps.sum()
    out = {}
    for s in SCORED:
        features = feats[s][0]
        n, _, h, w = features.shape
        maps = nearest(features, bank)[0][..., 0].reshape(n, 1, h, w)
        maps = torch.nn.functional.pad(maps, (radius,) * 4, mode="replicate")
        maps = torch.nn.functional.conv2d(maps, taps.view(1, 1, -1, 1))
        maps = torch.nn.functional.conv2d(maps, taps.view(1, 1, 1, -1))
        out[s] = maps.flatten(1).amax(1).numpy()
    return out


def coarse(feats, bank_size, param):
    """The patch grid pooled 2x2 (param avg or max) before the coreset and search: a fine first stage, the
    search cost of a grid half as fine."""
    pool = torch.nn.functional.max_pool2d if param == "max" else torch.nn.functional.avg_pool2d
    key = ("coarse", param)
    if key not in feats:
        feats[key] = {s: pool(feats[s][0], 2) for s in ("train", *SCORED)}
    pooled = feats[key]
    train = flat(pooled["train"])
    bank = train[_coreset(train, bank_size)].clone()
    return {s: nearest(pooled[s], bank)[0][..., 0].amax(1).numpy() for s in SCORED}


def _map_statistics(maps: torch.Tensor) -> np.ndarray:
    """(N, h*w) patch scores -> (N, 6): max, mean of the hottest 4, 16 and 64, mean, std."""
    ranked = maps.sort(1, descending=True).values
    return torch.stack(
        [ranked[:, 0], *(ranked[:, :k].mean(1) for k in (4, 16, 64)), maps.mean(1), maps.std(1)], 1
    ).numpy()


def supervised(feats, bank_size, param):
    """A logistic regression trained on the calibration split's labels (goods and defects), on image features.

    param FEATURES[:C]: FEATURES '+'-joined from pooled2..pooled5 (a stage's pooled features), pc (today's
    PatchCore score), maps (statistics of its patch-score map); C the inverse L2 strength (default 0.1).
    Calibration scores are out-of-fold (5 stratified folds), so the fpr threshold is chosen on scores of
    images the classifier did not train on; test is scored by a classifier trained on all of calibration.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names, _, c_text = param.partition(":")
    bank = _global_bank(feats, bank_size)
    maps = {s: nearest(feats[s][0], bank)[0][..., 0] for s in SCORED} if "pc" in names or "maps" in names else {}
    columns: dict[str, list[np.ndarray]] = {s: [] for s in SCORED}
    for name in names.split("+"):
        for s in SCORED:
            if name.startswith("pooled"):
                columns[s].append(feats["pooled"][int(name[-1])][s])
            else:
                columns[s].append(maps[s].amax(1, keepdim=True).numpy() if name == "pc" else _map_statistics(maps[s]))
    x = {s: np.hstack(columns[s]) for s in SCORED}
    y = feats["calibration"][1]

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=float(c_text or 0.1), max_iter=5000))

    out_of_fold = np.zeros(len(y))
    for train, held in StratifiedKFold(5, shuffle=True, random_state=0).split(x["calibration"], y):
        out_of_fold[held] = model().fit(x["calibration"][train], y[train]).decision_function(x["calibration"][held])
    return {"calibration": out_of_fold, "test": model().fit(x["calibration"], y).decision_function(x["test"])}


def density(feats, bank_size, param):
    """Local density normalisation (as LOF): a patch's nearest distance d(p, m*) against the spread of the bank
    around m*, r(m*) = mean distance from m* to its k nearest other entries. param MODE:K, MODE ratio (d / r)
    or minus (d - r); rare but normal patterns sit where the bank is sparse, so their distances count less."""
    mode, _, k_text = (param or "ratio").partition(":")
    k = int(k_text or 3)
    bank = _global_bank(feats, bank_size)
    norms = (bank * bank).sum(1)
    squared = (norms[:, None] - 2 * bank @ bank.t() + norms[None]).clamp(min=0)
    squared.fill_diagonal_(float("inf"))
    spread = squared.topk(k, dim=1, largest=False).values.sqrt().mean(1)
    out = {}
    for s in SCORED:
        dist, index = nearest(feats[s][0], bank)
        d, r = dist[..., 0], spread[index[..., 0]]
        out[s] = (d / r if mode == "ratio" else d - r).amax(1).numpy()
    return out


def simplenet(feats, bank_size, param):
    """SimpleNet (Liu et al. 2023) on the PatchCore patch features: a linear feature adaptor and a 2-layer
    discriminator trained to tell adapted good patches from the same plus Gaussian noise (truncated L1 loss,
    margins 0.5); patch score = -discriminator, image score = max. param SIGMA[:EPOCHS], SIGMA in units of the
    training patches' per-channel std (features are standardised first; the paper's 0.015 is for its scale).
    """
    sigma_text, _, epochs_text = (param or "0.5").partition(":")
    sigma, epochs = float(sigma_text), int(epochs_text or 8)
    mean, std = _standardiser(feats)
    train = (flat(feats["train"][0]) - mean) / std
    d = train.shape[1]
    generator = torch.Generator().manual_seed(_SEED["coreset"])
    torch.manual_seed(_SEED["coreset"])
    adaptor = torch.nn.Linear(d, d, bias=False)
    torch.nn.init.eye_(adaptor.weight)
    discriminator = torch.nn.Sequential(
        torch.nn.Linear(d, 1024), torch.nn.BatchNorm1d(1024), torch.nn.LeakyReLU(0.2), torch.nn.Linear(1024, 1)
    )
    optimiser = torch.optim.Adam(
        [{"params": adaptor.parameters(), "lr": 1e-4}, {"params": discriminator.parameters(), "lr": 2e-4}],
        weight_decay=1e-5,
    )
    batch = 4096
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), batch):
            good = adaptor(train[order[start : start + batch]])
            noisy = good + sigma * torch.randn(good.shape, generator=generator)
            loss = (
                torch.clamp(0.5 - discriminator(good), min=0).mean()
                + torch.clamp(0.5 + discriminator(noisy), min=0).mean()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(good)
        print(f"  simplenet epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f}", flush=True)
    adaptor.eval()
    discriminator.eval()
    out = {}
    with torch.no_grad():
        for s in SCORED:
            features = feats[s][0]
            n, _, h, w = features.shape
            patches = (flat(features) - mean) / std
            scores = torch.cat([-discriminator(adaptor(chunk))[:, 0] for chunk in patches.split(65536)])
            out[s] = scores.view(n, h * w).amax(1).numpy()
    return out


VARIANTS = {
    "simplenet": simplenet,
    "density": density,
    "supervised": supervised,
    "coarse": coarse,
    "whiten": whiten,
    "smooth": smooth,
    "gauss": gauss,
    "ensemble": ensemble,
    "fliptta": fliptta,
    "flipbank": flipbank,
    "global": global_max,
    "knn": knn,
    "topmean": topmean,
    "reweight": reweight,
    "position": position,
    "position_exact": position_exact,
    "posfeat": posfeat,
    "padim": padim,
}
