"""torchrun entry for tests/test_sharded_store.py: a small MLP sharded with FSDP2 on a CPU mesh (gloo).

    sharded_worker.py save STORE OUT   one AdamW step, then a sharded checkpoint (step 1) through runner.store.sharded
                                       and, for comparison, the full state (OUT/full.pt, rank 0)
    sharded_worker.py load STORE OUT   a fresh FSDP2 model and optimizer on this world size, load_shards of step 1,
                                       then the full state as loaded (OUT/reloaded.pt, rank 0)
"""
from __future__ import annotations

import sys

import torch

WIDTH = 24


def build_model() -> torch.nn.Module:
    """The same MLP on every rank (seeded): three Linear layers, sharded one by one with FSDP2 in `shard`."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                               torch.nn.ReLU(), torch.nn.Linear(WIDTH, 3))


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main(mode: str, store_url: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from runner.store import CheckpointStore
    from runner.store import sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = _shard(build_model(), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    store = CheckpointStore(store_url)
    if mode == "save":
        torch.manual_seed(1)  # the same batch on every rank
        model(torch.randn(8, 10)).pow(2).mean().backward()
        opt.step()
        msd, osd = get_state_dict(model, opt)
        assert type(next(iter(msd.values()))).__name__ == "DTensor"
        attempt = [sharded.new_attempt() if rank == 0 else None]
        dist.broadcast_object_list(attempt, src=0)
        entries = sharded.save_shards(store, 1, attempt[0], {"model": msd, "optim": osd, "run": {"world": world}})
        entries |= sharded.write_file(store, 1, attempt[0], f"rank-{rank:05d}.bin", f"rank {rank}".encode())
        gathered = [None] * world
        dist.all_gather_object(gathered, entries)
        if rank == 0:
            merged = {name: e for part in gathered for name, e in part.items()}
            sharded.commit_shards(store, 1, attempt[0], merged, {"world_size": world})
    else:
        msd, osd = get_state_dict(model, opt)  # a fresh optimizer: this initializes its state, the load target
        info = store.list()[-1]
        sharded.load_shards(store, info, {"model": msd, "optim": osd})
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
    if rank == 0:
        torch.save({"model": full[0], "optim": full[1]}, f"{out}/{'full' if mode == 'save' else 'reloaded'}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
