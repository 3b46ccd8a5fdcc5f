"""Datasets and loaders: sample contract, (seed, epoch, index) determinism, workers, resume,
sharding, corrupt files in both modes, and the synthetic fallback for an empty data.root."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from maxdeeplab.models.config import LossConfig
from maxdeeplab.platform.config import DataConfig
from maxdeeplab.platform.data.coco import CocoPanoptic
from maxdeeplab.platform.data.dataset import (
    PanopticEvalDataset,
    PanopticTrainDataset,
    batch_targets,
)
from maxdeeplab.platform.data.loader import (
    EpochSampler,
    ShardSampler,
    build_eval_dataset,
    build_loader,
    build_train_dataset,
    iterate_from,
    resolve_data_root,
)
from maxdeeplab.platform.data.synthetic import synthetic_cache_name
from maxdeeplab.platform.data.transforms import EvalTransform, TrainTransform, undo_eval_resize
from maxdeeplab.platform.errors import DataError

S = 65


def train_dataset(root: Path, **kwargs) -> PanopticTrainDataset:  # noqa: ANN003
    return PanopticTrainDataset(CocoPanoptic(root, "train2017"), TrainTransform(S), **kwargs)


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def take(batches: Iterator[dict], n: int) -> list[dict]:
    """The first n batches; closing the generator shuts the loader's workers down promptly."""
    out = [batch for _, batch in zip(range(n), batches, strict=False)]
    batches.close()  # type: ignore[attr-defined]
    return out


def test_sample_contract(synthetic_root: Path) -> None:
    dataset = train_dataset(synthetic_root, seed=1)
    info = dataset.split.info
    for key in range(len(dataset)):
        s = dataset[key]
        assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
        assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 255.0
        assert s["semantic"].dtype == s["thing_ids"].dtype == torch.int16  # compact transfer
        semantic, thing_ids, classes = (
            s["semantic"].long(),
            s["thing_ids"].long(),
            s["thing_classes"],
        )
        assert semantic.shape == thing_ids.shape == s["pixel_weights"].shape == (S, S)
        assert classes.shape == (128,)
        assert int(semantic.min()) >= 0 and int(semantic.max()) <= info.num_classes
        things = thing_ids >= 0
        # a thing id's class is the semantic label of its pixels, and always a thing class
        assert torch.equal(classes[thing_ids[things]], semantic[things])
        assert bool((semantic[things] <= info.num_thing_classes).all())
        n = int(thing_ids.max()) + 1
        assert bool((classes[:n] > 0).all()) and bool((classes[n:] == -1).all())
        # ids are numbered by first occurrence in the flattened crop
        flat = thing_ids.flatten()
        firsts = [int(torch.nonzero(flat == i)[0]) for i in range(n)]
        assert firsts == sorted(firsts)


def test_samples_are_a_function_of_seed_epoch_index(synthetic_root: Path) -> None:
    a, b = train_dataset(synthetic_root, seed=1), train_dataset(synthetic_root, seed=1)
    n = len(a)
    assert_batches_equal(a[3], b[3])
    assert_batches_equal(a[2 * n + 3], b[2 * n + 3])
    assert int(a[2 * n + 3]["epoch"]) == 2 and int(a[2 * n + 3]["index"]) == 3
    assert not torch.equal(a[3]["image"], a[n + 3]["image"])  # a new epoch, new augmentation
    assert not torch.equal(a[3]["image"], train_dataset(synthetic_root, seed=2)[3]["image"])


def test_loader_with_two_workers_matches_in_process_loading(synthetic_root: Path) -> None:
    dataset = train_dataset(synthetic_root, seed=0)
    in_process = build_loader(dataset, batch_size=2, num_workers=0, seed=4)
    workers = build_loader(dataset, batch_size=2, num_workers=2, seed=4)
    assert isinstance(workers.sampler, DistributedSampler)  # kept by Ray's prepare_data_loader
    assert workers.persistent_workers
    reference = take(iterate_from(in_process), 9)
    got = take(iterate_from(workers), 9)
    assert len(in_process) == 6
    for x, y in zip(reference, got, strict=True):
        assert_batches_equal(x, y)
    assert [int(b["epoch"][0]) for b in got] == [0] * 6 + [1] * 3
    epoch0 = torch.cat([b["index"] for b in got[:6]]).tolist()
    assert sorted(epoch0) == list(range(12))  # every image once per epoch
    targets = batch_targets(got[0])
    assert targets.semantic.shape == (2, S, S) and targets.thing_classes.shape == (2, 128)
    assert targets.semantic.dtype == targets.thing_ids.dtype == torch.int64
    # resuming at step 8 reproduces steps 8.. exactly
    assert_batches_equal(take(iterate_from(in_process, 8), 1)[0], reference[8])


def test_samplers_shard_without_overlap(synthetic_root: Path) -> None:
    dataset = train_dataset(synthetic_root)
    shards = [
        list(itertools.islice(EpochSampler(dataset, num_replicas=3, rank=r, seed=0), 4))
        for r in range(3)
    ]
    assert sorted(sum(shards, [])) == list(range(12))
    eval_dataset = PanopticEvalDataset(CocoPanoptic(synthetic_root, "val2017"), EvalTransform(S))
    eval_shards = [list(ShardSampler(eval_dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(eval_shards, [])) == [0, 1, 2, 3]  # no padding duplicates
    assert [len(ShardSampler(eval_dataset, num_replicas=3, rank=r)) for r in range(3)] == [2, 1, 1]


class Keys(torch.utils.data.Dataset):
    """A dataset of `size` items whose samples are their stream keys (epoch * size + index)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> int:
        return key


def test_a_dataset_smaller_than_the_batch_repeats_then_batches() -> None:
    """deeplab2's repeat().batch(): batches cut across epochs, each epoch a full permutation."""
    dataset = Keys(3)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, sampler=EpochSampler(dataset, num_replicas=1, rank=0, seed=0)
    )
    batches = [b.tolist() for b in itertools.islice(iterate_from(loader), 6)]
    stream = sum(batches, [])
    for epoch in range(4):  # 12 samples = 4 epochs of 3 images, each image once per epoch
        assert sorted(k % 3 for k in stream[3 * epoch : 3 * epoch + 3]) == [0, 1, 2]
        assert {k // 3 for k in stream[3 * epoch : 3 * epoch + 3]} == {epoch}
    assert batches[1][0] // 3 == 0 and batches[1][1] // 3 == 1  # batch 1 spans epochs 0 and 1
    for start in range(6):  # resuming at any batch replays the same batches
        assert next(iterate_from(loader, start)).tolist() == batches[start]


def test_eval_items_carry_what_pq_needs(synthetic_root: Path) -> None:
    split = CocoPanoptic(synthetic_root, "val2017")
    loader = build_loader(
        PanopticEvalDataset(split, EvalTransform(S)), batch_size=2, num_workers=0, train=False
    )
    items = [item for batch in loader for item in batch["items"]]
    assert [item.image_id for item in items] == [r.image_id for r in split.records]
    item = items[0]
    # deeplab2's float32 two-step resize: 97 -> 65 -> 49 rows (exact rationals would give 48).
    assert item.raw_size == (97, 129) and item.resized_size == (49, 65)
    np.testing.assert_array_equal(item.gt_ids, split.load_panoptic(0))
    assert {s["id"] for s in item.segments} == set(np.unique(item.gt_ids).tolist()) - {0}
    assert item.image.shape == (3, S, S) and bool((item.image[:, 49:, :] == 127.5).all())
    label = np.zeros((S, S), np.int64)
    assert undo_eval_resize(label, item.resized_size, item.raw_size).shape == item.raw_size


@pytest.fixture()
def corrupt_root(broken_copy: Path) -> tuple[Path, Path]:
    """The synthetic set with its third training JPEG truncated."""
    split = CocoPanoptic(broken_copy, "train2017")
    victim = split.image_path(split[2])
    victim.write_bytes(victim.read_bytes()[:300])
    return broken_copy, victim


def test_corrupt_file_raises_naming_it(corrupt_root: tuple[Path, Path]) -> None:
    root, victim = corrupt_root
    dataset = train_dataset(root)
    with pytest.raises(DataError, match=victim.name):
        dataset[2]
    loader = build_loader(dataset, batch_size=12, num_workers=1)
    with pytest.raises(DataError, match=victim.name):  # raised in a worker, re-raised here
        next(iter(loader))


def test_skip_corrupt_skips_counts_and_keeps_batches_full(
    corrupt_root: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root, victim = corrupt_root
    dataset = train_dataset(root, skip_corrupt=True)
    batches = list(itertools.islice(build_loader(dataset, batch_size=4, num_workers=2), 3))
    assert [len(b["index"]) for b in batches] == [4, 4, 4]
    assert 2 not in torch.cat([b["index"] for b in batches]).tolist()
    assert dataset.corrupt.count == 1 and dataset.corrupt.indices() == [2]
    eval_set = PanopticEvalDataset(
        CocoPanoptic(root, "train2017"), EvalTransform(S), skip_corrupt=True
    )
    with caplog.at_level("WARNING"):
        items = [i for b in build_loader(eval_set, batch_size=3, train=False) for i in b["items"]]
    assert len(items) == 11 and eval_set.corrupt.count == 1 and victim.name in caplog.text


def test_empty_root_uses_the_cached_synthetic_set(tmp_path: Path) -> None:
    cfg = DataConfig(
        root="", crop_size=S, synthetic_train=3, synthetic_val=2, synthetic_size=[40, 48]
    )
    root = resolve_data_root(cfg, tmp_path)
    assert root == tmp_path / "data" / synthetic_cache_name(3, 2, 40, 48, 0)
    train = build_train_dataset(cfg, LossConfig(), cache_dir=tmp_path, seed=0)
    assert len(train) == 3 and train[0]["image"].shape == (3, S, S)
    assert len(build_eval_dataset(cfg, cache_dir=tmp_path)) == 2
    shutil.rmtree(root / "val2017")  # not regenerated once it exists
    assert resolve_data_root(cfg, tmp_path) == root
    with pytest.raises(DataError, match="dataset root not found"):
        resolve_data_root(DataConfig(root=str(tmp_path / "absent")), tmp_path)
