import pytest
import torch

from lineguard.trainer.coreset import CoresetSpec, greedy_coreset


def covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).min(dim=1).values.max())


def test_greedy_picks_the_farthest_point_each_time_on_a_hand_made_line():
    # Points on a line at 0, 1, 2, 10. Starting from whichever the seed picks, the next pick is
    # the farthest point: from 0/1/2 that is 10; from 10 it is 0.
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    chosen = greedy_coreset(points, CoresetSpec(target_size=2, projection_dim=0, seed=0)).tolist()
    expected_next = {0: 3, 1: 3, 2: 3, 3: 0}
    assert chosen[1] == expected_next[chosen[0]]


def test_three_centres_on_a_line_cover_it_with_the_hand_computed_radius():
    # Centres must include both ends after the start; with points 0..10 and start anywhere, three
    # greedy centres include 0 and 10 and one in between, so the radius is at most 5.
    points = torch.arange(11, dtype=torch.float32).unsqueeze(1)
    chosen = greedy_coreset(points, CoresetSpec(target_size=3, projection_dim=0, seed=1))
    assert covering_radius(points, chosen) <= 5.0


def test_indices_are_distinct_and_the_size_is_the_target():
    points = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    chosen = greedy_coreset(points, CoresetSpec(target_size=50, projection_dim=8, seed=0))
    assert len(chosen) == 50
    assert len(set(chosen.tolist())) == 50


def test_a_target_above_the_point_count_keeps_every_point():
    points = torch.randn(10, 4)
    assert greedy_coreset(points, CoresetSpec(target_size=100)).tolist() == list(range(10))


def test_the_same_seed_gives_the_same_coreset():
    points = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    spec = CoresetSpec(target_size=20, projection_dim=8, seed=7)
    assert torch.equal(greedy_coreset(points, spec), greedy_coreset(points, spec))


def test_greedy_covers_better_than_a_random_subset_of_the_same_size():
    # Clustered data with one small, far cluster: random sampling tends to miss it, greedy never does.
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(2000, 8, generator=generator)
    rare = torch.randn(10, 8, generator=generator) * 0.1 + 20.0
    points = torch.cat([big, rare])
    chosen = greedy_coreset(points, CoresetSpec(target_size=40, projection_dim=0, seed=0))
    random_subset = torch.randperm(len(points), generator=generator)[:40]
    assert covering_radius(points, chosen) < covering_radius(points, random_subset)
    assert any(i >= 2000 for i in chosen.tolist())


def test_random_projection_still_finds_the_rare_cluster():
    generator = torch.Generator().manual_seed(2)
    points = torch.cat([torch.randn(3000, 256, generator=generator), torch.randn(5, 256, generator=generator) + 8.0])
    chosen = greedy_coreset(points, CoresetSpec(target_size=10, projection_dim=32, seed=0))
    assert any(i >= 3000 for i in chosen.tolist())


@pytest.mark.parametrize("kwargs", [{"target_size": 0}, {"target_size": 5, "projection_dim": -1}])
def test_bad_specs_are_refused(kwargs):
    with pytest.raises(ValueError, match="coreset"):
        CoresetSpec(**kwargs)


def test_empty_features_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        greedy_coreset(torch.empty(0, 3), CoresetSpec(target_size=1))


def test_the_two_pass_selection_on_many_patches_still_keeps_a_rare_cluster_and_covers_well():
    generator = torch.Generator().manual_seed(3)
    common = torch.randn(20_000, 16, generator=generator)
    rare = torch.randn(4, 16, generator=generator) * 0.1 + 12.0
    points = torch.cat([common[:7000], rare, common[7000:]])  # the rare patches sit inside one chunk
    spec = CoresetSpec(target_size=200, projection_dim=0, max_candidates=2000, chunk_size=1000)
    chosen = greedy_coreset(points, spec)
    assert len(set(chosen.tolist())) == 200
    assert any(7000 <= i < 7004 for i in chosen.tolist())
    one_pass = greedy_coreset(points, CoresetSpec(target_size=200, projection_dim=0, max_candidates=30_000))
    assert covering_radius(points, chosen) <= 1.25 * covering_radius(points, one_pass)
