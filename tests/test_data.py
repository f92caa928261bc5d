"""Data handling for training (pwconv_cy.data): the .npz loader's checks, normalisation,
resampling, augmentation, the stratified split and batching."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwconv_cy import data


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_dataset_reads_and_normalises(tmp_path, rng):
    points = rng.normal(size=(6, 20, 3)) * 5 + 3
    path = _write(tmp_path / "d.npz", points=points.astype(np.float16), labels=np.arange(6) % 2,
                  class_names=np.array(["a", "b", "c"]))
    ds = data.load_dataset(path)
    assert ds.points.dtype == np.float32 and ds.points.shape == (6, 20, 3)
    assert ds.labels.dtype == np.int64 and ds.n_classes == 3 and ds.class_names == ["a", "b", "c"]
    np.testing.assert_allclose(ds.points.mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ds.points, axis=-1).max(axis=1), 1, rtol=1e-6)
    sub = ds.subset(np.array([1, 3]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1] and sub.n_classes == 3
    no_names = data.load_dataset(_write(tmp_path / "e.npz", points=points, labels=np.arange(6)))
    assert no_names.n_classes == 6 and no_names.class_names is None


def test_load_dataset_errors(tmp_path):
    good = {"points": np.zeros((4, 5, 3)), "labels": np.arange(4)}
    cases = [
        ({"points": None}, r"missing key 'points' \(found keys \['labels'\]\)"),
        ({"points": np.zeros((4, 5, 3), bool)}, "must be real numbers .*found dtype bool"),
        ({"points": np.zeros((0, 5, 3)), "labels": np.zeros(0, int)},
         r"at least one cloud of at least one point, found shape \(0, 5, 3\)"),
        ({"points": np.full((4, 5, 3), 1e39)}, "non-finite coordinates .*beyond float32"),
        ({"labels": np.array([0, 1, 2, 44], dtype=np.uint8)}, None),
        ({"labels": np.array([True, False, True, False])}, "must be integers .*found dtype bool"),
        ({"labels": np.arange(4).reshape(2, 2)}, r"found shape \(2, 2\)"),
        ({"class_names": np.array([1, 2, 3, 4])},
         "'class_names' must be a non-empty 1-D array of strings, found shape .* dtype int64"),
    ]
    for i, (edit, message) in enumerate(cases):
        arrays = {**good, **edit}
        path = _write(tmp_path / f"bad{i}.npz", **{k: v for k, v in arrays.items()
                                                  if v is not None})
        if message is None:  # unsigned labels are fine
            assert data.load_dataset(path).labels.tolist() == [0, 1, 2, 44]
            continue
        with pytest.raises(ValueError, match=message):
            data.load_dataset(path)
    with pytest.raises(FileNotFoundError, match="absent.npz: no such file"):
        data.load_dataset(tmp_path / "absent.npz")
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="x.npz: cannot be read as an .npz file"):
        data.load_dataset(tmp_path / "x.npz")


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_resample_keeps_each_point_at_most_once_or_all_points(m, n, seed):
    cloud = np.arange(m * 3, dtype=np.float64).reshape(m, 3)  # rows identify points
    out = data.resample(cloud, n, np.random.default_rng(seed))
    assert out.shape == (n, 3)
    ids = out[:, 0].astype(int) // 3
    assert np.all(out == cloud[ids])  # whole original points
    counts = np.bincount(ids, minlength=m)
    if m >= n:
        assert counts.max() == 1  # a subset without replacement
    else:
        assert counts.min() >= 1  # every point, plus duplicates
    again = data.resample(cloud, n, np.random.default_rng(seed))
    assert np.array_equal(out, again)
    batch = data.resample_batch(np.stack([cloud, cloud + 0.5]), n, np.random.default_rng(seed))
    assert batch.shape == (2, n, 3)
    if m >= n:
        assert all(np.unique(b[:, 0]).size == n for b in batch)


def test_resample_batch_subsets_are_uniform(rng):
    # each of 8 points is kept by a 2-of-8 subset with probability 1/4
    points = np.tile(np.arange(8.0)[:, None], (4000, 1, 3))
    kept = data.resample_batch(points, 2, rng)[..., 0].astype(int)
    freq = np.bincount(kept.ravel(), minlength=8) / 4000
    np.testing.assert_allclose(freq, 0.25, atol=0.03)
    with pytest.raises(ValueError, match="empty cloud"):
        data.resample(np.zeros((0, 3)), 4, rng)


def test_augment_rotates_about_z_and_jitters_within_the_clip(rng):
    points = rng.normal(size=(5, 50, 3)).astype(np.float32)
    rotated = data.augment(points, np.random.default_rng(1), jitter_sigma=0)
    np.testing.assert_array_equal(rotated[..., 2], points[..., 2])
    np.testing.assert_allclose(np.linalg.norm(rotated[..., :2], axis=-1),
                               np.linalg.norm(points[..., :2], axis=-1), rtol=1e-5)
    assert not np.allclose(rotated, points)
    # the same rotation for all points of a cloud: pairwise distances are kept
    d0 = np.linalg.norm(points[0, :, None] - points[0, None], axis=-1)
    d1 = np.linalg.norm(rotated[0, :, None] - rotated[0, None], axis=-1)
    np.testing.assert_allclose(d0, d1, atol=1e-5)
    jittered = data.augment(points, np.random.default_rng(2), rotate=False, jitter_sigma=0.05,
                            jitter_clip=0.05)
    delta = jittered - points
    assert np.abs(delta).max() <= 0.05 + 1e-6 and np.isclose(np.abs(delta).max(), 0.05)
    assert 0.02 < delta.std() < 0.05
    assert np.array_equal(data.augment(points, np.random.default_rng(3)),
                          data.augment(points, np.random.default_rng(3)))
    assert points.dtype == np.float32  # input untouched


def test_augment_scale_and_shift_are_per_cloud_and_per_axis_within_their_ranges(rng):
    points = rng.normal(size=(400, 50, 3)).astype(np.float32)
    out = data.augment(points, np.random.default_rng(4), rotate=False, jitter_sigma=0,
                       scale_range=(0.5, 2.0), shift=0.3)
    # out = points * a + b per cloud and axis: recover a and b by least squares per cloud
    p64, o64 = points.astype(np.float64), out.astype(np.float64)
    pc, oc = p64 - p64.mean(axis=1, keepdims=True), o64 - o64.mean(axis=1, keepdims=True)
    a = (pc * oc).sum(axis=1) / (pc * pc).sum(axis=1)
    b = o64.mean(axis=1) - a * p64.mean(axis=1)
    np.testing.assert_allclose(out, points * a[:, None] + b[:, None], rtol=1e-4, atol=1e-4)
    assert a.min() >= 0.5 - 1e-4 and a.max() <= 2.0 + 1e-4
    assert np.abs(b).max() <= 0.3 + 1e-4
    assert a.std(axis=1).mean() > 0.1 and a.std(axis=0).mean() > 0.1  # per axis, per cloud
    assert b.std(axis=0).mean() > 0.05
    with pytest.raises(ValueError, match=r"scale_range must be \(low, high\) with 0 < low"):
        data.augment(points, rng, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="shift must be >= 0, got -0.1"):
        data.augment(points, rng, shift=-0.1)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
       fraction=st.floats(0, 0.9), seed=st.integers(0, 1000))
def test_stratified_split_per_class(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    train, val = data.stratified_split(labels, fraction, seed)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    for c, n in enumerate(counts):
        n_val = int(np.sum(labels[val] == c))
        expected = min(max(round(fraction * n), 1 if fraction > 0 and n >= 2 else 0), n - 1)
        assert n_val == expected
        assert np.sum(labels[train] == c) >= 1
    again = data.stratified_split(labels, fraction, seed)
    assert np.array_equal(again[1], val)


def test_limit_and_batches(rng):
    labels = np.array([2, 0, 2, 1, 0, 2, 2])
    assert data.limit_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4]
    batches = data.batch_indices(7, 3)
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    shuffled = data.batch_indices(7, 3, rng)
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(7))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(1e-3, 1e3), n=st.integers(1, 30))
def test_normalize_clouds_is_invariant_to_translation_and_scale(seed, scale, n):
    cloud = np.random.default_rng(seed).normal(size=(n, 3))
    offset = np.array([5.0, -2.0, 1.0])
    a = data.normalize_clouds(cloud)
    b = data.normalize_clouds(cloud * scale + offset)
    # Equal up to the float32 rounding of the moved coordinates (normalize_clouds works in
    # float32), which the normalisation magnifies by |offset| / (the moved cloud's radius).
    spread = scale * np.linalg.norm(cloud - cloud.mean(axis=0), axis=-1).max()
    magnified = np.abs(offset).max() / spread if spread > 0 else 0.0
    np.testing.assert_allclose(a, b, atol=1e-5 + 8 * np.finfo(np.float32).eps * magnified)
    radius = np.linalg.norm(a, axis=-1).max()
    assert radius == pytest.approx(1.0, rel=1e-5) or (n == 1 and radius == 0)
