"""FastFlow and FCDD on small real textures, and what every model kind shares: persistence, variable-size export.

The math gets hand-checked cases (coupling log-determinant against autograd, HSC loss, the
Gaussian receptive-field upsampling, early stopping); fitting is checked by what a user sees:
the training loss goes down and the exported graph scores what torch scores.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from lineguard.trainer.errors import ModelError
from lineguard.trainer.export import check_parity, export_onnx
from lineguard.trainer.models import MODELS, load_model
from lineguard.trainer.models.base import BestWeights, TrainingImages, save_model
from lineguard.trainer.models.fastflow import AffineCoupling, FastFlow, FastFlowConfig, _extract, fit_fastflow
from lineguard.trainer.models.fcdd import (
    Fcdd,
    FcddConfig,
    build_fcdd,
    fit_fcdd,
    hsc_loss,
    pixel_hsc_loss,
    receptive_upsampling_kernel,
)
from lineguard.trainer.models.outliers import confetti, confetti_images
from lineguard.trainer.models.patchcore import PatchCoreConfig
from lineguard.trainer.scoring import score_images


def gravel_crops(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    texture = skdata.gravel()
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, texture.shape[0] - size, (n, 2))
    return np.stack([texture[y : y + size, x : x + size, None] for y, x in corners]).astype(np.uint8)


def with_validation(good: np.ndarray, seed: int = 1) -> TrainingImages:
    """Good crops to train on, plus held-out good crops and their confetti versions as labelled validation."""
    held_out = gravel_crops(4, seed=seed)
    validation = np.concatenate([held_out, confetti_images(held_out, 4, seed=seed)[0]])
    return TrainingImages(good=good, validation=validation, validation_labels=np.array([0] * 4 + [1] * 4))


QUICK = {
    "patchcore": PatchCoreConfig(input_height=64, input_width=64, channels=1, max_bank_size=256),
    "fastflow": FastFlowConfig(input_height=64, input_width=64, channels=1, epochs=4, batch_size=4),
    "fcdd": FcddConfig(input_height=64, input_width=64, channels=1, epochs=4, batch_size=8, outliers_per_image=2),
}


@pytest.fixture(scope="module")
def fitted() -> dict[str, torch.nn.Module]:
    images = with_validation(gravel_crops(8))
    return {name: MODELS[name].fit(QUICK[name], images, False) for name in QUICK}


# --- the math ---------------------------------------------------------------------------------------


def test_a_coupling_step_reports_the_log_determinant_of_its_jacobian():
    torch.manual_seed(0)
    step = AffineCoupling(channels=4, hidden=8, kernel=1, clamp=2.0)
    torch.nn.init.normal_(step.subnet[-1].weight, std=0.5)  # a fresh step is the identity; make it not
    x = torch.randn(1, 4, 1, 1)
    jacobian = torch.autograd.functional.jacobian(lambda v: step(v)[0], x).reshape(4, 4)
    _, expected = torch.linalg.slogdet(jacobian)
    assert step(x)[1].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_hypersphere_loss_matches_hand_computed_values():
    good = torch.full((1, 1, 2, 2), 0.5)  # mean distance 0.5 -> loss 0.5
    outlier = torch.full((1, 1, 2, 2), math.log(2.0))  # -log(1 - exp(-ln 2)) = ln 2
    assert hsc_loss(good, torch.tensor([0.0])).item() == pytest.approx(0.5)
    assert hsc_loss(outlier, torch.tensor([1.0])).item() == pytest.approx(math.log(2.0))
    both = hsc_loss(torch.cat([good, outlier]), torch.tensor([0.0, 1.0])).item()
    assert both == pytest.approx((0.5 + math.log(2.0)) / 2)
    # an outlier mapped to the centre costs a lot, a good image mapped far away too
    assert hsc_loss(torch.zeros(1, 1, 2, 2), torch.tensor([1.0])).item() > 10
    assert hsc_loss(torch.full((1, 1, 2, 2), 20.0), torch.tensor([0.0])).item() == pytest.approx(20.0)


def test_the_cell_level_loss_weighs_normal_and_anomalous_cells_equally():
    distances = torch.tensor([[[[0.2, 0.2], [0.2, math.log(2.0)]]]])
    labels = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    # normal cells: mean 0.2; the anomalous cell: -log(1 - 1/2) = ln 2
    assert pixel_hsc_loss(distances, labels).item() == pytest.approx(0.2 + math.log(2.0), rel=1e-5)


def test_receptive_field_upsampling_is_centred_and_keeps_a_flat_map_flat(fitted):
    taps, padding = receptive_upsampling_kernel(stride=8, sigma=2.0)
    assert len(taps) == 8 + 2 * 6 and padding == 6
    np.testing.assert_allclose(taps.numpy(), taps.flip(0).numpy())  # symmetric around the cell centre
    model: Fcdd = fitted["fcdd"]
    flat = model.upsample(torch.full((2, 1, 8, 8), 3.0))
    assert flat.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(flat.numpy(), 3.0, rtol=1e-5)  # border-normalised: no dark frame
    spot = torch.zeros(1, 1, 8, 8)
    spot[0, 0, 3, 4] = 1.0
    heat = model.upsample(spot)[0, 0]
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 3 * 8 <= y < 4 * 8 and 4 * 8 <= x < 5 * 8  # the cell's own pixels are hottest


def test_the_separable_upsampling_is_the_two_dimensional_gaussian_transposed_convolution(fitted):
    model: Fcdd = fitted["fcdd"]
    taps, padding = receptive_upsampling_kernel(model.config.stride, model.config.upsample_sigma)
    kernel = (taps[:, None] * taps[None, :]).view(1, 1, len(taps), len(taps))
    cells = torch.rand(3, 1, 6, 9, generator=torch.Generator().manual_seed(0))
    stride = model.config.stride

    def spread(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv_transpose2d(x, kernel, stride=stride, padding=padding)

    np.testing.assert_allclose(
        model.upsample(cells).numpy(), (spread(cells) / spread(torch.ones_like(cells))).numpy(), rtol=1e-5
    )


def test_an_fcdd_saved_with_its_two_dimensional_upsampling_kernel_still_loads(fitted):
    model: Fcdd = fitted["fcdd"]
    taps, _ = receptive_upsampling_kernel(model.config.stride, model.config.upsample_sigma)
    old_state = {**model.state_dict(), "upsample_kernel": (taps[:, None] * taps[None, :]).view(1, 1, len(taps), -1)}
    loaded = build_fcdd(model.config, old_state)
    images = torch.from_numpy(gravel_crops(2, seed=8))
    np.testing.assert_array_equal(model(images)[0].detach().numpy(), loaded(images)[0].detach().numpy())


def test_early_stopping_keeps_the_best_epoch_breaks_ties_by_loss_and_stops_after_patience():
    model = torch.nn.Linear(1, 1)
    best = BestWeights(patience=2)
    history = [(0.8, 1.0), (0.9, 0.9), (0.9, 0.8), (0.85, 0.7), (0.9, 0.95)]
    kept = []
    for epoch, (auroc, loss) in enumerate(history):
        with torch.no_grad():
            model.weight.fill_(epoch)
        kept.append(best.update(model, epoch, validation=auroc, loss=loss))
    assert kept == [True, True, True, False, False]
    assert best.best_epoch == 2 and best.should_stop  # the tie at epoch 2 won on loss but did not reset patience
    best.restore(model)
    assert model.weight.item() == 2.0
    with pytest.raises(ModelError, match="patience"):
        BestWeights(patience=0)


def test_confetti_outliers_are_deterministic_and_change_only_part_of_the_image():
    image = gravel_crops(1, size=128)[0]
    first, where = confetti(image, np.random.default_rng(5))
    again, _ = confetti(image, np.random.default_rng(5))
    np.testing.assert_array_equal(first, again)
    changed = np.any(first != image, axis=2)
    assert 0.0 < changed.mean() < 0.6
    assert where[changed].min() > 0 and not changed[where == 0].any()  # the mask says where the pieces went
    images, masks = confetti_images(gravel_crops(2), 5, seed=0)
    assert images.shape == (5, 64, 64, 1) and masks.shape == (5, 64, 64)


def test_confetti_pieces_are_blobs_and_thin_strokes():
    """Strokes are what taught FCDD thin defects. Elongation = area / width^2 (width at the widest
    point): an ellipse of the blobs' axis ratios stays below pi / 4 * 4.5 = 3.5, a stroke is
    length / width, 5 or more."""
    rng = np.random.default_rng(0)
    image = gravel_crops(1, size=256)[0]
    elongations = []
    for _ in range(40):
        _, where = confetti(image, rng, max_pieces=1)
        inside = (where > 0.25).astype(np.uint8)
        width = 2 * cv2.distanceTransform(inside, cv2.DIST_L2, 3).max()
        elongations.append(inside.sum() / width**2)
    assert sum(e >= 4.0 for e in elongations) >= 8 and sum(e <= 1.5 for e in elongations) >= 8


# --- fitting ----------------------------------------------------------------------------------------


def test_fitting_fastflow_lowers_the_likelihood_loss_of_its_training_features():
    config = FastFlowConfig(input_height=64, input_width=64, channels=1, epochs=6, patience=6, batch_size=4)
    good = gravel_crops(8)
    fresh = FastFlow(config)
    fresh.set_feature_statistics(_extract(fresh, good))
    fitted_model = fit_fastflow(config, TrainingImages(good=good))  # no validation: keeps the lowest-loss epoch

    def training_loss(model: FastFlow) -> float:
        with torch.no_grad():
            return float(
                torch.stack(
                    [m.mean() for m in model.stage_nll(model.standardised_features(torch.from_numpy(good)))]
                ).mean()
            )

    assert training_loss(fitted_model) < training_loss(fresh) - 0.05


def test_fitting_fcdd_lowers_the_hypersphere_loss_and_separates_outliers():
    config = FcddConfig(
        input_height=64, input_width=64, channels=1, epochs=6, patience=6, batch_size=8, outliers_per_image=2
    )
    good = gravel_crops(8)
    outliers, masks = confetti_images(good, round(config.outliers_per_image * len(good)), seed=config.seed)  # as fit
    fitted_model = fit_fcdd(config, TrainingImages(good=good))
    fresh = Fcdd(config)
    fresh.load_state_dict(
        {k: v for k, v in fitted_model.state_dict().items() if not k.startswith("head.")}, strict=False
    )
    fresh.head.load_state_dict(Fcdd(config).head.state_dict())  # same statistics, untrained head

    def loss(model: Fcdd) -> float:
        features = torch.cat(
            [model.stacked_features(torch.from_numpy(good)), model.stacked_features(torch.from_numpy(outliers))]
        )
        cells = torch.nn.functional.avg_pool2d(torch.from_numpy(masks)[:, None], config.stride)
        labels = torch.cat([torch.zeros(len(good), *cells.shape[1:]), cells])
        with torch.no_grad():
            return float(pixel_hsc_loss(model.distances(features), labels))

    assert loss(fitted_model) < loss(fresh)
    held_out = gravel_crops(4, seed=9)
    good_scores, _ = score_images(fitted_model, held_out)
    outlier_scores, _ = score_images(fitted_model, confetti_images(held_out, 4, seed=9)[0])
    assert good_scores.mean() < outlier_scores.mean()


def test_fcdd_learns_from_labelled_defects_when_given():
    config = FcddConfig(
        input_height=64, input_width=64, channels=1, epochs=2, batch_size=8, outliers_per_image=0.5, learning_rate=1e-3
    )
    good = gravel_crops(6)
    defects = 255 - gravel_crops(2, seed=4)  # inverted texture: unmistakably not normal
    model = fit_fcdd(config, TrainingImages(good=good, defects=defects))
    scores, _ = score_images(model, np.concatenate([gravel_crops(2, seed=8), 255 - gravel_crops(2, seed=8)]))
    assert scores[2:].min() > scores[:2].max()


def test_training_images_of_the_wrong_size_are_refused_with_the_expected_shape():
    with pytest.raises(ModelError, match=r"\(N, 64, 64, 1\)"):
        fit_fastflow(QUICK["fastflow"], TrainingImages(good=gravel_crops(2, size=96)))
    with pytest.raises(ModelError, match="multiple of 32"):
        FcddConfig(input_height=100)


# --- the shared contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(QUICK))
def test_a_saved_model_of_each_kind_loads_with_identical_scores(fitted, name, tmp_path):
    save_model(MODELS[name], fitted[name], tmp_path / "model")
    kind, loaded = load_model(tmp_path / "model")
    assert kind.name == name and loaded.config == fitted[name].config
    images = gravel_crops(2, seed=5)
    np.testing.assert_array_equal(score_images(fitted[name], images)[0], score_images(loaded, images)[0])


def test_loading_from_an_empty_folder_says_to_fit_first(tmp_path):
    with pytest.raises(ModelError, match="run `lineguard-train fit` first"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["fastflow", "fcdd"])
def test_fully_convolutional_models_export_one_graph_that_scores_other_sizes_like_torch(fitted, name, tmp_path):
    model = fitted[name]
    onnx_path = export_onnx(model, tmp_path / "model.onnx", height=64, width=64, channels=1, variable_size=True)
    assert check_parity(model, onnx_path, gravel_crops(3, seed=6)).max_score_rel_diff < 1e-4
    wider = gravel_crops(2, size=128, seed=7)[:, :96]  # 96 x 128: another height and width
    report = check_parity(model, onnx_path, wider)
    assert report.max_score_rel_diff < 1e-4 and report.max_map_rel_diff < 1e-3
