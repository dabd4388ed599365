import numpy as np
import pytest

from tidy_detect.config import RepresentationConfig
from tidy_detect.errors import ConfigError
from tidy_detect.features import discrepancy as d


def test_global_distance_raw_hand_computed():
    i0 = np.array([1.0, 2.0, -3.0])
    t0 = np.array([0.5, 4.0, -1.0])
    np.testing.assert_allclose(d.global_distance(i0, t0, normalize=False), [0.5, 2.0, 2.0])


def test_global_distance_normalized_hand_computed():
    # |(3,4)/5 - (0,1)| = |(0.6, 0.8) - (0, 1)| = (0.6, 0.2)
    np.testing.assert_allclose(d.global_distance(np.array([3.0, 4.0]), np.array([0.0, 2.0])), [0.6, 0.2], atol=1e-6)


def test_local_distance_is_mean_of_object_differences():
    li = np.array([[1.0, 0.0], [0.0, 3.0]])
    lt = np.array([[0.0, 0.0], [0.0, 1.0]])
    dl, fallback = d.local_distance(li, lt, np.zeros(2), normalize=False)
    # (|1-0|, |0-0|) and (|0-0|, |3-1|) -> mean (0.5, 1.0)
    np.testing.assert_allclose(dl, [0.5, 1.0])
    assert not fallback


def test_local_distance_falls_back_to_global_without_objects():
    dg = np.array([0.25, 0.75])
    dl, fallback = d.local_distance(np.zeros((0, 2)), np.zeros((0, 2)), dg)
    np.testing.assert_allclose(dl, dg)
    assert fallback


def test_combine_weights():
    np.testing.assert_allclose(d.combine(np.array([1.0, 2.0]), np.array([3.0, 5.0]), 2.0, 0.5), [3.5, 6.5])


def test_cosine_discrepancy():
    assert d.cosine_discrepancy(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(0.0)
    assert d.cosine_discrepancy(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(1.0)
    assert d.cosine_discrepancy(np.array([1.0, 0.0]), np.array([-1.0, 0.0])) == pytest.approx(2.0)


def test_batch_local_matches_single_and_flags_fallback():
    rng = np.random.default_rng(0)
    dg = rng.random((3, 4)).astype(np.float32)
    li = [rng.random((2, 4)), np.zeros((0, 4)), rng.random((3, 4))]
    lt = [rng.random((2, 4)), np.zeros((0, 4)), rng.random((3, 4))]
    batch, fallback = d.batch_local_distance(li, lt, dg, normalize=True)
    for k in range(3):
        single, fb = d.local_distance(li[k], lt[k], dg[k], normalize=True)
        np.testing.assert_allclose(batch[k], single, rtol=1e-6)
        assert fallback[k] == fb
    assert fallback.tolist() == [False, True, False]


def test_representation_kinds_hand_computed():
    gi = np.array([[3.0, 4.0]])
    gt = np.array([[0.0, 1.0]])
    li = [np.array([[1.0, 0.0]])]
    lt = [np.array([[0.0, 1.0]])]
    dg = np.array([[0.6, 0.2]])
    dl = np.array([[1.0, 1.0]])
    rep = lambda kind, **kw: d.representation(RepresentationConfig(kind=kind, **kw), gi, gt, li, lt)  # noqa: E731
    np.testing.assert_allclose(rep("image"), [[0.6, 0.8]], atol=1e-6)
    np.testing.assert_allclose(rep("text"), [[0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(rep("global"), dg, atol=1e-6)
    np.testing.assert_allclose(rep("local"), dl, atol=1e-6)
    np.testing.assert_allclose(rep("both"), dg + dl, atol=1e-6)
    np.testing.assert_allclose(rep("both", w1=2.0, w2=0.5), 2 * dg + 0.5 * dl, atol=1e-6)
    np.testing.assert_allclose(rep("image", normalize=False), gi)


def test_representation_config_validates():
    with pytest.raises(ConfigError, match="w1 must be >= 0, got -1.0"):
        RepresentationConfig(w1=-1.0)
    with pytest.raises(ConfigError, match="representation must be one of"):
        RepresentationConfig(kind="pixels")
