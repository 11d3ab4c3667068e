"""nvflare_unlearn.data: loaders, class splits and partitioners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nvflare_unlearn.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CifarTransform,
    LabelledDataset,
    digits_dataset,
    filter_classes,
    load_dataset,
    npz_dataset,
    partition_biased,
    partition_dirichlet,
    partition_iid,
    site_class_counts,
    split_forget_retain,
    stratified_subset_indices,
)

# ---------------------------------------------------------------- digits


def test_digits_split_is_deterministic_disjoint_and_stratified():
    a, b = digits_dataset("train"), digits_dataset("train")
    test = digits_dataset("test")
    assert np.array_equal(a.x, b.x) and np.array_equal(a.targets, b.targets)
    assert len(a) + len(test) == 1797
    assert a.x.shape[1:] == (1, 8, 8) and a.x.dtype == np.float32
    assert 0.0 <= a.x.min() and a.x.max() <= 1.0
    assert a.classes == [str(i) for i in range(10)] and a.targets.dtype == np.int64
    # stratified: every class keeps ~25 % of its images in test
    share = test.class_counts() / (a.class_counts() + test.class_counts())
    assert np.all(np.abs(share - 0.25) < 0.02)
    # disjoint: no train image appears in test
    train_rows = {r.tobytes() + bytes([t]) for r, t in zip(a.x, a.targets)}
    overlap = sum(r.tobytes() + bytes([t]) in train_rows for r, t in zip(test.x, test.targets))
    assert overlap == 0
    other = digits_dataset("train", seed=1)
    assert not np.array_equal(other.targets, a.targets) or not np.array_equal(other.x, a.x)


def test_digits_items_feed_a_dataloader():
    ds = digits_dataset("test")
    x, y = next(iter(DataLoader(ds, batch_size=16)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"test_fraction": 0.0}, {"test_fraction": 1.5}])
def test_digits_bad_args(kwargs):
    with pytest.raises(ValueError):
        digits_dataset(**kwargs)


# ---------------------------------------------------------------- npz folder (fake, tiny)


def _fake_cifar(folder, n_per_class=6, k=10, sharded=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y = np.repeat(np.arange(k), n_per_class).astype(np.int64)
    x = rng.integers(0, 256, size=(y.size, 32, 32, 3), dtype=np.uint8)
    if sharded:
        half = y.size // 2
        np.savez_compressed(folder / "train_0.npz", x=x[:half], y=y[:half])
        np.savez_compressed(folder / "train_1.npz", x=x[half:], y=y[half:])
    else:
        np.savez_compressed(folder / "train.npz", x=x, y=y)
    np.savez_compressed(folder / "test.npz", x=x[:k], y=y[:k])
    (folder / "classes.txt").write_text("\n".join(f"c{i}" for i in range(k)) + "\n")
    return x, y


def test_npz_loader_concatenates_shards_and_normalises(tmp_path):
    x, y = _fake_cifar(tmp_path / "cifar10")
    ds = npz_dataset(tmp_path / "cifar10", "train")
    assert len(ds) == y.size and np.array_equal(ds.targets, y)
    assert ds.classes == [f"c{i}" for i in range(10)]
    img, label = ds[7]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == int(y[7])
    # hand check one pixel: (v / 255 - mean) / std, channel by channel
    for c in range(3):
        expect = (x[7, 3, 5, c] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert img[c, 3, 5].item() == pytest.approx(expect, abs=1e-5)
    test = npz_dataset(tmp_path / "cifar10", "test")
    assert len(test) == 10


def test_normalisation_is_stated_and_the_default_is_unchanged(tmp_path):
    """normalize="dataset" (the default) keeps CIFAR's published statistics; "none" and explicit mean/std match a
    user's own transform (ToTensor, then Normalize(mean, std)); the same setting reaches each site's loader."""
    from nvflare_unlearn.fl.site_data import load_site_split
    from nvflare_unlearn.options import SiteDataOptions

    x, _ = _fake_cifar(tmp_path / "cifar10")
    default = load_dataset("cifar10", root=tmp_path, split="train")
    same = load_dataset("cifar10", root=tmp_path, split="train", normalize="dataset")
    assert torch.equal(default[7][0], same[7][0]) and torch.equal(
        default[7][0], npz_dataset(tmp_path / "cifar10")[7][0]
    )
    raw = load_dataset("cifar10", root=tmp_path, split="train", normalize="none")[7][0]
    assert raw[1, 3, 5].item() == pytest.approx(x[7, 3, 5, 1] / 255.0, abs=1e-6) and 0 <= raw.min() <= raw.max() <= 1
    half = '{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}'  # torchvision hello-pt style, as JSON text
    mine = load_dataset("cifar10", root=tmp_path, split="train", normalize=half)[7][0]
    assert torch.allclose(mine, (raw - 0.5) / 0.5, atol=1e-5)
    one = load_dataset("cifar10", root=tmp_path, split="train", normalize={"mean": 0.5, "std": 0.5})[7][0]
    assert torch.allclose(one, mine, atol=1e-6)  # one value broadcasts over the channels
    # digits: no normalisation by default (as before), explicit statistics on request
    digits = load_dataset("digits", split="test")
    assert digits.transform is None
    scaled = load_dataset("digits", split="test", normalize={"mean": [0.25], "std": [0.5]})
    assert torch.allclose(scaled[0][0], (torch.from_numpy(digits.x[0]) - 0.25) / 0.5)
    # the option: one spelling in the job config, checked where it is given
    opts = SiteDataOptions.from_dict({"normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    assert opts.normalize == '{"mean":[0.5,0.5,0.5],"std":[0.5,0.5,0.5]}' and SiteDataOptions().normalize == "dataset"
    site = load_site_split("site-1", "train", {"num_clients": 1, "normalize": '{"mean": [0.25], "std": [0.5]}'})
    assert torch.allclose(site[0][0], (torch.from_numpy(site.x[0]) - 0.25) / 0.5)
    for bad in ("cifar", '{"mean": [0.5]}', {"mean": [0.5], "std": [0.0]}, {"mean": [0.5, 0.5], "std": [1.0]}):
        with pytest.raises(ValueError, match="normalize"):
            SiteDataOptions(normalize=bad)
    with pytest.raises(ValueError, match="channel"):
        load_dataset("cifar10", root=tmp_path, normalize={"mean": [0.5, 0.5], "std": [0.5, 0.5]})


def test_npz_single_file_and_load_dataset_dispatch(tmp_path):
    _fake_cifar(tmp_path / "cifar100", n_per_class=2, k=100, sharded=False)
    ds = load_dataset("cifar100", root=tmp_path, split="train")  # root holding cifar100/
    assert len(ds) == 200 and ds.num_classes == 100
    same = load_dataset("cifar100", root=tmp_path / "cifar100")  # the dataset folder itself
    assert np.array_equal(same.targets, ds.targets)
    sub = load_dataset("cifar100", root=tmp_path, subset=100, seed=3)
    assert len(sub) == 100 and np.array_equal(sub.class_counts(), np.ones(100))


def test_npz_augmentation_keeps_shape_and_varies(tmp_path):
    _fake_cifar(tmp_path / "cifar10")
    ds = npz_dataset(tmp_path / "cifar10", "train", augment=True)
    plain = npz_dataset(tmp_path / "cifar10", "train")
    views = torch.stack([ds[0][0] for _ in range(12)])
    assert views.shape == (12, 3, 32, 32)
    assert not all(torch.equal(v, plain[0][0]) for v in views)


def test_cifar_transform_crop_flip_is_a_shifted_copy():
    img = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)
    t = CifarTransform((0, 0, 0), (1 / 255, 1 / 255, 1 / 255), augment=True)  # identity normalisation
    padded = torch.zeros((3, 40, 40))
    padded[:, 4:36, 4:36] = img.float()
    candidates = [v for top in range(9) for left in range(9) for v in (padded[:, top : top + 32, left : left + 32],)]
    candidates += [v.flip(-1) for v in candidates]
    seen_shift = seen_flip = False
    for _ in range(20):
        out = t(img)
        matches = [i for i, v in enumerate(candidates) if torch.allclose(out, v, atol=1e-3)]
        assert matches, "augmented image is not a padded crop (or its mirror) of the input"
        seen_flip |= matches[0] >= 81
        seen_shift |= matches[0] % 81 != 40  # 40 = (top 4, left 4): the unshifted crop
    assert seen_shift and seen_flip


def test_missing_data_raises_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFLARE_UNLEARN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="NVFLARE_UNLEARN_DATA"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="empty"):
        (tmp_path / "empty").mkdir()
        npz_dataset(tmp_path / "empty", "train")
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar10", root=tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="subset"):
        load_dataset("digits", subset=10_000)


def test_npz_with_wrong_arrays_is_a_value_error(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="'x' and 'y'"):
        npz_dataset(tmp_path, "train")


@pytest.mark.data
def test_real_cifar10_and_cifar100(cifar_root):
    test = load_dataset("cifar10", root=cifar_root, split="test")
    assert len(test) == 10_000 and np.array_equal(test.class_counts(), np.full(10, 1000))
    assert test.classes[0] == "airplane" and test.classes[9] == "truck"
    x, y = next(iter(DataLoader(test.subset(np.arange(0, 10_000, 100)), batch_size=100)))
    assert x.shape == (100, 3, 32, 32)
    # normalised with CIFAR statistics: per-channel mean near 0 over a class-balanced sample
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.3
    train = load_dataset("cifar10", root=cifar_root, split="train", subset=1000, seed=0)
    assert np.array_equal(train.class_counts(), np.full(10, 100))
    c100 = load_dataset("cifar100", root=cifar_root, split="train")
    assert len(c100) == 15_000 and c100.num_classes == 100


# ---------------------------------------------------------------- classes, U/R split


def _toy(n_per_class=5, k=4):
    y = np.repeat(np.arange(k), n_per_class)
    x = np.arange(y.size, dtype=np.float32).reshape(-1, 1, 1, 1)
    return LabelledDataset(x, y, [f"k{i}" for i in range(k)])


def test_split_forget_retain_partitions_by_class():
    ds = _toy()
    u, r = split_forget_retain(ds, [1, 3])
    assert set(u.targets) == {1, 3} and set(r.targets) == {0, 2}
    assert len(u) + len(r) == len(ds)
    assert sorted(np.concatenate([u.x.ravel(), r.x.ravel()]).tolist()) == ds.x.ravel().tolist()
    assert u.classes == ds.classes  # label space kept whole
    u1, _ = split_forget_retain(ds, 2)
    assert set(u1.targets) == {2} and len(u1) == 5


def test_filter_classes_keep_and_drop():
    ds = _toy()
    assert set(filter_classes(ds, keep=[0]).targets) == {0}
    assert set(filter_classes(ds, drop=[0]).targets) == {1, 2, 3}
    assert len(filter_classes(ds, drop=[])) == len(ds)


@pytest.mark.parametrize(
    "call",
    [
        lambda ds: split_forget_retain(ds, [7]),
        lambda ds: split_forget_retain(ds, []),
        lambda ds: split_forget_retain(ds, [-1]),
        lambda ds: filter_classes(ds),
        lambda ds: filter_classes(ds, keep=[0], drop=[1]),
        lambda ds: filter_classes(ds, keep=["a"]),
    ],
)
def test_class_helpers_reject_bad_ids(call):
    with pytest.raises(ValueError):
        call(_toy())


def test_labelled_dataset_validates():
    with pytest.raises(ValueError, match="samples"):
        LabelledDataset(np.zeros((3, 1)), np.zeros(2, dtype=int), ["a"])
    with pytest.raises(ValueError, match="labels must lie"):
        LabelledDataset(np.zeros((2, 1)), np.array([0, 5]), ["a", "b"])


def test_stratified_subset_is_balanced_even_on_sorted_labels():
    labels = np.repeat(np.arange(10), 100)  # sorted, like the shared CIFAR files
    idx = stratified_subset_indices(labels, 55, seed=0)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.sum() == 55 and counts.max() - counts.min() <= 1
    assert np.array_equal(idx, stratified_subset_indices(labels, 55, seed=0))
    assert not np.array_equal(idx, stratified_subset_indices(labels, 55, seed=1))


# ---------------------------------------------------------------- partitioners


def _labels(n_per_class=200, k=10, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(k), n_per_class))


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))


PARTITIONERS = {
    "iid": lambda y, s, seed: partition_iid(y, s, seed=seed),
    "dirichlet": lambda y, s, seed: partition_dirichlet(y, s, alpha=0.3, seed=seed),
    "biased": lambda y, s, seed: partition_biased(y, s, q=0.5, seed=seed),
}


@pytest.mark.parametrize("name", list(PARTITIONERS))
@pytest.mark.parametrize("n_sites", [1, 3, 10, 100])
def test_partition_covers_every_sample_once_and_is_deterministic(name, n_sites):
    y = _labels()
    parts = PARTITIONERS[name](y, n_sites, 7)
    assert len(parts) == n_sites
    _assert_exact_cover(parts, y.size)
    assert all(p.size >= 1 for p in parts)
    again = PARTITIONERS[name](y, n_sites, 7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if n_sites > 1:
        other = PARTITIONERS[name](y, n_sites, 8)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_balanced():
    sizes = [p.size for p in partition_iid(_labels(), 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def _mean_classes_per_site(counts, min_share=0.05):
    share = counts / counts.sum(axis=1, keepdims=True)
    return float((share > min_share).sum(axis=1).mean())


def test_biased_q1_gives_each_site_only_its_group_class_and_q01_is_near_iid():
    y = _labels()
    strong = site_class_counts(y, partition_biased(y, 10, q=1.0, seed=0), 10)
    # q = 1, 10 sites, 10 classes: one site per group, so every site holds exactly one class
    assert np.all((strong > 0).sum(axis=1) == 1)
    assert sorted(strong.argmax(axis=1).tolist()) == list(range(10))
    weak = site_class_counts(y, partition_biased(y, 10, q=0.1, seed=0), 10)
    # q = 1/M is IID: every site sees every class, its largest class near 10 %
    assert np.all((weak > 0).sum(axis=1) == 10)
    top_share = (weak.max(axis=1) / weak.sum(axis=1)).mean()
    assert top_share < 0.2
    # the bias property itself: share of a site's data coming from its dominant class grows with q
    mid = site_class_counts(y, partition_biased(y, 10, q=0.5, seed=0), 10)
    mid_share = (mid.max(axis=1) / mid.sum(axis=1)).mean()
    assert top_share < mid_share < 1.0
    assert mid_share == pytest.approx(0.5, abs=0.08)


def test_biased_groups_at_100_sites():
    y = _labels()
    parts = partition_biased(y, 100, q=1.0, seed=0)
    counts = site_class_counts(y, parts, 10)
    assert np.all((counts > 0).sum(axis=1) == 1)  # 10 groups of 10 sites, one class per group
    per_class_sites = [(counts[:, c] > 0).sum() for c in range(10)]
    assert per_class_sites == [10] * 10


def test_biased_fewer_sites_than_classes():
    y = _labels()
    counts = site_class_counts(y, partition_biased(y, 3, q=1.0, seed=0), 10)
    # 3 groups: label m goes to group m mod 3, so the sites hold disjoint class sets
    held = [set(np.flatnonzero(row).tolist()) for row in counts]
    assert sorted(len(h) for h in held) == [3, 3, 4]
    assert set().union(*held) == set(range(10)) and sum(len(h) for h in held) == 10


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    y = _labels()
    skewed = site_class_counts(y, partition_dirichlet(y, 10, alpha=0.1, seed=0), 10)
    flat = site_class_counts(y, partition_dirichlet(y, 10, alpha=100.0, seed=0), 10)
    assert _mean_classes_per_site(skewed) < 5 < _mean_classes_per_site(flat)
    assert _mean_classes_per_site(flat) == 10


@pytest.mark.parametrize(
    "call",
    [
        lambda y: partition_biased(y, 10, q=1.5),
        lambda y: partition_biased(y, 10, q=-0.1),
        lambda y: partition_biased(y, 10, q=0.5, num_groups=11),
        lambda y: partition_iid(y, 0),
        lambda y: partition_dirichlet(y, 0, alpha=1.0),
        lambda y: partition_dirichlet(y, 5, alpha=0.0),
        lambda y: partition_iid(y.astype(float), 2),
        lambda y: partition_dirichlet(y, 5000, alpha=1.0),
    ],
)
def test_partition_bad_args(call):
    with pytest.raises(ValueError):
        call(_labels())
