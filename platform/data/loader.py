"""Data loaders for training and evaluation, ready for Ray Train's `prepare_data_loader`.

The samplers subclass `DistributedSampler`, so `prepare_data_loader` keeps them (it only replaces a
sampler that is not one) and merely adds the device transfer; the loader keeps its worker
processes, pinned memory and persistent workers. `EpochSampler` makes the data a function of
(seed, epoch, position): each rank reads its shard of a seeded permutation, epoch after epoch
without end, the keys it yields carry the epoch to the worker processes, and `set_position` resumes
anywhere in the stream. Batches are cut from that stream as deeplab2 does (`repeat()` then
`batch()`, deeplab2/data/dataloader/input_reader.py): a batch may span two epochs, so a dataset
smaller than the batch still trains. `ShardSampler`
splits the evaluation set without the padding duplicates of `DistributedSampler` (they would be
counted twice by PQ).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from maxdeeplab.models.config import LossConfig
from maxdeeplab.platform.config import DataConfig
from maxdeeplab.platform.data.coco import CocoPanoptic, require_root
from maxdeeplab.platform.data.dataset import (
    PanopticEvalDataset,
    PanopticTrainDataset,
    collate_eval,
    collate_train,
)
from maxdeeplab.platform.data.synthetic import ensure_synthetic
from maxdeeplab.platform.data.transforms import EvalTransform, TrainTransform, scale_choices


def world() -> tuple[int, int]:
    """(num_replicas, rank) of the current process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """This rank's endless stream: its shard of epoch 0's seeded permutation, then epoch 1's, ...

    It yields `epoch * N + index` keys (N = len(dataset)). `set_position(p)` starts the next
    iteration at the p-th sample of this rank's stream (resuming); `set_epoch` is not needed.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        default_replicas, default_rank = world()
        super().__init__(
            dataset,
            num_replicas=default_replicas if num_replicas is None else num_replicas,
            rank=default_rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        if self.num_samples == 0:
            raise ValueError("the training set is empty")
        self.position = 0

    def set_position(self, position: int) -> None:
        self.position = position

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        epoch, offset = divmod(self.position, self.num_samples)
        while True:
            self.set_epoch(epoch)  # DistributedSampler permutes with seed + epoch
            for i in list(super().__iter__())[offset:]:
                yield epoch * size + i
            epoch, offset = epoch + 1, 0


class ShardSampler(DistributedSampler):
    """Indices rank, rank + R, rank + 2R, ... in order, without padding (for evaluation)."""

    def __init__(
        self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        default_replicas, default_rank = world()
        super().__init__(
            dataset,
            num_replicas=default_replicas if num_replicas is None else num_replicas,
            rank=default_rank if rank is None else rank,
            shuffle=False,
        )
        size = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(self.rank, size, self.num_replicas))
        self.total_size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    train: bool = True,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader over a train or eval dataset, sharded across the process group.

    Args:
        dataset: a PanopticTrainDataset (train=True) or PanopticEvalDataset (train=False).
        batch_size: per-process batch size.
        num_workers: decoding/augmenting worker processes (0 = in this process).
        train: shuffle per epoch and drop the last incomplete batch; else shard in order.
        seed: the shuffling seed (the dataset holds the augmentation seed).
        num_replicas, rank: the shard; default from torch.distributed, else (1, 0).
        pin_memory: default: CUDA is available.
        persistent_workers: keep the worker processes between epochs (with num_workers > 0).
        prefetch_factor: batches each worker prepares ahead.

    Returns:
        The DataLoader; its sampler is an `EpochSampler` (train) or `ShardSampler` (eval).
    """
    sampler: DistributedSampler
    if train:
        sampler = EpochSampler(dataset, num_replicas, rank, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(dataset, num_replicas, rank)
    workers_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        workers_kwargs = {
            "persistent_workers": persistent_workers,
            "prefetch_factor": prefetch_factor,
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_train if train else collate_eval,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train,
        **workers_kwargs,
    )


def loader_sampler(loader: Any) -> DistributedSampler:
    """The sampler of a loader, also through Ray's device-transfer wrapper."""
    inner = getattr(loader, "_dataloader", loader)
    return inner.sampler


def iterate_from(loader: Any, start_step: int = 0) -> Iterator[Any]:
    """Endless training batches starting at this rank's batch `start_step` (exact resume).

    Batch k holds samples [k * b, (k + 1) * b) of the rank's sample stream (b = the loader's
    batch size), whatever epochs they belong to, so batch s is the same whether iteration starts
    at 0 or at s.
    """
    inner = getattr(loader, "_dataloader", loader)
    sampler = loader_sampler(loader)
    if not isinstance(sampler, EpochSampler):
        raise TypeError("iterate_from needs a training loader (build_loader(train=True))")
    sampler.set_position(start_step * (inner.batch_size or 1))
    yield from loader


def resolve_data_root(data_cfg: DataConfig, cache_dir: str | Path) -> Path:
    """`data.root`, or, when it is empty, the synthetic set generated once under cache_dir/data.

    Every node generates the synthetic set into its own cache on first use (the generator is
    seeded, so all nodes hold the same images).
    """
    if data_cfg.root:
        return require_root(data_cfg.root)
    height, width = data_cfg.synthetic_size
    return ensure_synthetic(
        Path(cache_dir) / "data",
        num_train=data_cfg.synthetic_train,
        num_val=data_cfg.synthetic_val,
        height=int(height),
        width=int(width),
        seed=data_cfg.synthetic_seed,
    )


def build_train_dataset(
    data_cfg: DataConfig, loss_cfg: LossConfig, *, cache_dir: str | Path, seed: int
) -> PanopticTrainDataset:
    """The training dataset of an experiment (cfg.data, cfg.loss, cfg.cache_dir, cfg.seed)."""
    split = CocoPanoptic(resolve_data_root(data_cfg, cache_dir), data_cfg.train_split)
    scales = scale_choices(data_cfg.min_scale, data_cfg.max_scale, data_cfg.scale_step)
    return PanopticTrainDataset(
        split,
        TrainTransform(data_cfg.crop_size, tuple(float(s) for s in scales)),
        seed=seed,
        max_thing_id=loss_cfg.max_thing_id,
        small_instance_weight=loss_cfg.small_instance_weight,
        small_instance_area=loss_cfg.small_instance_area,
        skip_corrupt=data_cfg.skip_corrupt,
    )


def build_eval_dataset(data_cfg: DataConfig, *, cache_dir: str | Path) -> PanopticEvalDataset:
    """The evaluation dataset of an experiment (`cfg.data.val_split`)."""
    split = CocoPanoptic(resolve_data_root(data_cfg, cache_dir), data_cfg.val_split)
    return PanopticEvalDataset(
        split, EvalTransform(data_cfg.crop_size), skip_corrupt=data_cfg.skip_corrupt
    )
