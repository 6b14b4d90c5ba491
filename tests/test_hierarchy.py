"""core.hierarchy: groups of similar clusters and merge suggestions."""
import numpy as np
import pytest

from core.hierarchy import ClusterHierarchy, default_n_groups


def planted_centroids(n_classes=4, per_class=5, dim=16, noise=0.15, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, dim))
    cents, truth = [], []
    for c in range(n_classes):
        for _ in range(per_class):
            cents.append(protos[c] + noise * rng.normal(size=dim))
            truth.append(c)
    order = rng.permutation(len(cents))          # the pieces of a class are scattered over indices
    return np.asarray(cents)[order], np.asarray(truth)[order]


def test_groups_recover_the_classes_split_by_over_clustering():
    cents, truth = planted_centroids()
    tree = ClusterHierarchy().fit(cents)
    groups = tree.groups(4)
    assert sorted(len(g) for g in groups) == [5, 5, 5, 5]
    for g in groups:
        assert len(set(truth[g])) == 1                  # each group is one planted class
    assert sorted(i for g in groups for i in g) == list(range(20))
    # tree order puts the members of a group next to each other
    pos = {int(leaf): p for p, leaf in enumerate(tree.order_)}
    for g in groups:
        ps = sorted(pos[i] for i in g)
        assert ps == list(range(ps[0], ps[0] + len(g)))
    assert tree.cohesion(groups[0]) > 0.8
    assert tree.cohesion([3]) == 1.0


def test_group_ids_are_deterministic_and_follow_tree_order():
    cents, _ = planted_centroids(seed=3)
    a = ClusterHierarchy().fit(cents).labels(6)
    b = ClusterHierarchy().fit(cents.copy() * 3.0).labels(6)   # scale does not matter (cosine)
    assert np.array_equal(a, b)
    tree = ClusterHierarchy().fit(cents)
    assert tree.labels(6)[tree.order_[0]] == 0
    assert len(tree.groups(1)) == 1 and len(tree.groups(20)) == 20


def test_similar_pairs_are_same_class_first_and_can_be_limited():
    cents, truth = planted_centroids()
    tree = ClusterHierarchy().fit(cents)
    pairs = tree.similar_pairs(10)
    assert len(pairs) == 10
    assert all(truth[i] == truth[j] for i, j, _ in pairs)
    sims = [s for _, _, s in pairs]
    assert sims == sorted(sims, reverse=True)
    only = tree.similar_pairs(None, among=[7])
    assert len(only) == 19 and all(7 in (i, j) for i, j, _ in only)
    assert tree.similar_pairs(None, min_similarity=1.01) == []
    best, s = tree.nearest(7, [i for i in range(20) if truth[i] != truth[7]] + [7])
    assert truth[best] != truth[7] and s < max(x for _, _, x in only)


def test_validation_messages():
    with pytest.raises(ValueError, match="linkage"):
        ClusterHierarchy(linkage="ward-ish").fit(np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        ClusterHierarchy().fit(np.full((3, 2), np.nan))
    tree = ClusterHierarchy().fit(np.eye(3))
    with pytest.raises(ValueError, match="n_groups"):
        tree.labels(4)
    with pytest.raises(RuntimeError, match="fit"):
        ClusterHierarchy().groups(2)
    assert ClusterHierarchy().fit(np.ones((1, 4))).groups(1) == [[0]]
    assert default_n_groups(40) == 10 and default_n_groups(3) == 1 and default_n_groups(1) == 1


def test_naming_actions_count_a_pure_group_as_one_action_and_each_exception_as_one_more():
    cents, truth = planted_centroids()                   # 4 classes x 5 clusters
    tree = ClusterHierarchy().fit(cents)
    assert tree.naming_actions(truth, n_groups=4) == 4                     # one per group
    assert tree.naming_actions(truth, n_groups=20) == 20                   # no groups: one per cluster
    odd = truth.copy()
    member = tree.groups(4)[0][0]
    odd[member] = (truth[member] + 1) % 4                                   # one cluster named otherwise
    assert tree.naming_actions(odd, n_groups=4) == 5
    unnamed = truth.copy()
    unnamed[tree.groups(4)[1]] = -1                                         # a group left unnamed
    assert tree.naming_actions(unnamed, n_groups=4) == 3
    with pytest.raises(ValueError, match="names for 20 clusters"):
        tree.naming_actions(truth[:5])
