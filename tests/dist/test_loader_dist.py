"""The train loader in 2 real gloo processes x 2 DataLoader workers, on real shards."""
import datetime
import json
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.views import CropGroup, ViewSpec

pytestmark = pytest.mark.dist

WORLD, B, N = 2, 32, 2040
SPEC = ViewSpec([CropGroup(1, 8)], policy="supervised", in_chans=1)


def _worker(rank, init_file, scenarios, out_dir):
    # A collective timeout turns a hang at an epoch end into an error, not a stuck test (long
    # enough for a first batch, with forkserver start-up, on a loaded 2-core machine).
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=90))
    result = {}
    for name, (shard_dir, drop_last) in scenarios.items():
        loader = build_train_loader(shard_dir, SPEC, B, rank=rank, world_size=WORLD,
                                    num_workers=2, seed=0, drop_last=drop_last)
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            ids, synced = [], []
            for batch in loader:
                # DDP-like: one collective per step; unequal batch counts would block here.
                t = torch.tensor([float(batch["index"].numel())])
                dist.all_reduce(t)
                synced.append(t.item())
                ids += batch["index"].tolist()
            counts = [None] * WORLD
            dist.all_gather_object(counts, len(synced))
            epochs.append({"ids": ids, "synced": synced, "counts": counts, "len": len(loader)})
        result[name] = epochs
    dist.barrier()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def three_shards(fmnist_dir, tmp_path_factory):
    """The same 2,040 images in 3 shards (700, 700, 640): fewer shards than 2 ranks x 2 workers."""
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("three_shards")
    write_dataset(f"idx:{fmnist_dir}", out, split="train",
                  subset="per-class:204", samples_per_shard=700, seed=0)
    return out


@pytest.mark.timeout(300)
def test_two_ranks_two_workers(fmnist2k_shards, three_shards, tmp_path):
    scenarios = {"uneven8": (str(fmnist2k_shards), False), "three": (str(three_shards), False),
                 "three_drop": (str(three_shards), True)}
    mp.start_processes(_worker, args=(str(tmp_path / "init"), scenarios, str(tmp_path)),
                       nprocs=WORLD, join=True, start_method="spawn")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for name, (_, drop_last) in scenarios.items():
        orders = []
        for epoch in range(2):
            per_rank = [res[r][name][epoch] for r in range(WORLD)]
            nb = N // (WORLD * B) if drop_last else -(-N // (WORLD * B))
            for e in per_rank:  # every rank: same, announced batch count; all full batches
                assert e["counts"] == [nb] * WORLD and e["len"] == nb
                assert e["synced"] == [float(WORLD * B)] * nb
            ids = per_rank[0]["ids"] + per_rank[1]["ids"]
            counts = Counter(ids)
            assert len(ids) == nb * WORLD * B
            if drop_last:  # each id at most once, fewer than R*B dropped
                assert max(counts.values()) == 1 and N - len(counts) < WORLD * B
            else:  # every id, and only the documented T - N padding repeats
                assert set(counts) == set(range(N)) and len(ids) - N == 2048 - N
            orders.append(per_rank[0]["ids"])
        assert orders[0] != orders[1], name  # the next epoch's order differs
        assert set(orders[0]) != set(orders[1]), name  # and so does each rank's share
