"""What a sharded checkpoint (dist.strategy: fsdp) costs, against the other ways to write the same state, in one run.

    .venv/bin/python benchmarks/sharded_bench.py [--params-m 25] [--ranks 1 2 4]

For each number of ranks it launches itself under torchrun (gloo, CPU): a GPT of about `--params-m` million
parameters sharded with FSDP2, one AdamW step (so the optimizer holds its moments), then, on the same state and the
same local disk, best of 2:
1. runner's sharded save: every rank writes its shards (store.sharded.save_shards, hashed as written), rank 0
   commits the manifest; the bytes each rank wrote;
2. DCP's own dcp.save (FileSystemWriter) of the same state dict;
3. today's DDP path: the full state gathered to rank 0 (get_state_dict with full_state_dict, cpu_offload) and
   written by rank 0 alone (CheckpointStore.commit of torch.save);
4. runner's restore: a fresh sharded model and optimizer, load_shards + set_state_dict;
5. DDP's question: the same model unsharded, its whole state on every rank, written by rank 0 alone (today's DDP
   checkpoint) or spread over the ranks through the sharded format (DCP gives each replicated tensor to one rank).
Per rank it records the peak RSS growth during the save and the restore (VmHWM after clearing it) as a multiple of
the rank's own shard of the state. Writes benchmarks/results/sharded.json and prints a table; the README summarizes
it. Absolute times depend on the shared machine: compare the columns of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sharded.json"


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def clear_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(fn, repeats: int = 2) -> tuple[float, float]:
    """(best seconds, peak RSS growth in MiB) of fn() over `repeats` runs."""
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        clear_peak()
        before = rss_kib("VmRSS")
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, (rss_kib("VmHWM") - before) / 1024)
    return best, peak


def local_tensors(obj):
    """This rank's part of every tensor in a nested state dict (a DTensor's local shard)."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from local_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from local_tensors(value)
    elif hasattr(obj, "to_local"):
        yield obj.to_local()
    elif hasattr(obj, "element_size"):
        yield obj


def worker(params_m: float, out: Path) -> None:
    import torch
    import torch.distributed as tdist
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(ROOT))
    from runner.models import GPT
    from runner.store import CheckpointStore, sharded

    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.set_num_threads(1)
    width = 512
    layers = max(1, round(params_m * 1e6 / (12 * width * width)))

    def build():
        torch.manual_seed(0)
        model = GPT(vocab_size=256, context=64, layers=layers, heads=8, width=width)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, optimizer = build()
    x = torch.randint(0, 256, (2, 64))
    torch.nn.functional.cross_entropy(model(x), x).backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    shard_mib = sum(t.numel() * t.element_size() for t in local_tensors(state)) / 2**20
    base = Path(os.environ["BENCH_DIR"])
    store = CheckpointStore(str(base / "runner"))
    step = iter(range(1, 100))
    wrote = {}

    def save_through_sharded_format(target: CheckpointStore, state_dict: dict, key: str) -> None:
        """runner's sharded save of `state_dict` from every rank; the bytes this rank wrote go to wrote[key]."""
        attempt = [sharded.new_attempt()]
        tdist.broadcast_object_list(attempt, src=0)
        n = next(step)
        files = sharded.save_shards(target, n, attempt[0], state_dict)
        wrote[key] = sum(e["size"] for e in files.values())
        gathered = [None] * world
        tdist.all_gather_object(gathered, files)
        if rank == 0:
            sharded.commit_shards(target, n, attempt[0], {k: v for f in gathered for k, v in f.items()}, {})
        tdist.barrier()

    def save_from_rank0(target: CheckpointStore, whole: dict) -> None:
        """Rank 0 alone torch.saves `whole` (on rank 0: the whole state) as one state.pt."""
        n = next(step)  # on every rank: the ranks' step numbers must stay the same
        if rank == 0:
            target.commit(n, {"state.pt": lambda f: torch.save(whole, f)}, {})
        tdist.barrier()

    def runner_save():
        save_through_sharded_format(store, state, "bytes")

    def dcp_own_save():
        target = base / f"dcp-{next(step)}"
        dcp_save(state, storage_writer=FileSystemWriter(str(target)))
        tdist.barrier()

    full_store = CheckpointStore(str(base / "rank0"))

    def rank0_save():
        full_model, full_optimizer = get_state_dict(model, optimizer,
                                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        save_from_rank0(full_store, {"model": full_model, "optimizer": full_optimizer})

    # DDP: every rank holds the whole state. Today rank 0 writes it all; the sharded format could spread it, since
    # DCP's planner gives each replicated tensor to one rank.
    torch.manual_seed(0)
    plain = GPT(vocab_size=256, context=64, layers=layers, heads=8, width=width)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(plain(x), x).backward()
    plain_optimizer.step()
    plain_model_state, plain_optimizer_state = get_state_dict(plain, plain_optimizer)
    replicated = {"model": plain_model_state, "optimizer": plain_optimizer_state}
    ddp_store = CheckpointStore(str(base / "ddp"))

    def ddp_rank0_save():
        save_from_rank0(ddp_store, {"model": plain.state_dict(), "optimizer": plain_optimizer.state_dict()})

    def ddp_spread_save():
        save_through_sharded_format(ddp_store, replicated, "ddp_spread_bytes")

    results = {}
    for name, fn in (("runner_sharded_save", runner_save), ("dcp_save", dcp_own_save), ("rank0_full_save", rank0_save),
                     ("ddp_rank0_save", ddp_rank0_save), ("ddp_spread_save", ddp_spread_save)):
        tdist.barrier()
        results[name] = measure(fn)
    results["bytes_written_by_rank"] = wrote["bytes"]
    results["ddp_spread_bytes_by_rank"] = wrote["ddp_spread_bytes"]
    newest = store.list()[-1]
    fresh_model, fresh_optimizer = build()

    def restore():
        ms, os_ = get_state_dict(fresh_model, fresh_optimizer)
        target = {"model": ms, "optimizer": os_}
        sharded.load_shards(store, newest, target)
        set_state_dict(fresh_model, fresh_optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optimizer"])
        tdist.barrier()

    tdist.barrier()
    results["runner_restore"] = measure(restore)
    results["shard_mib"] = shard_mib
    results["params"] = sum(p.numel() for p in fresh_model.parameters())
    every = [None] * world
    tdist.all_gather_object(every, results)
    if rank == 0:
        out.write_text(json.dumps(every))
    tdist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params-m", type=float, default=25.0)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(args.params_m, Path(args.out))
        return
    runs = {}
    for n in args.ranks:
        with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
            out = Path(tmp) / "out.json"
            env = {**os.environ, "BENCH_DIR": tmp, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                            __file__, "--worker", "--params-m", str(args.params_m), "--out", str(out)],
                           env=env, check=True)
            runs[n] = json.loads(out.read_text())
            shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for n, ranks in runs.items():
        r0 = ranks[0]
        state_mib = sum(r["shard_mib"] for r in ranks)
        row = {"ranks": n, "params": r0["params"], "state_mib": round(state_mib, 1),
               "max_shard_mib": round(max(r["shard_mib"] for r in ranks), 1),
               "max_bytes_written_by_one_rank_mib": round(max(r["bytes_written_by_rank"] for r in ranks) / 2**20, 1)}
        spread = max(r["ddp_spread_bytes_by_rank"] for r in ranks)
        row["ddp_spread_max_bytes_by_one_rank_mib"] = round(spread / 2**20, 1)
        for key in ("runner_sharded_save", "dcp_save", "rank0_full_save", "runner_restore", "ddp_rank0_save",
                    "ddp_spread_save"):
            seconds = max(r[key][0] for r in ranks)  # the slowest rank sets the pace
            row[f"{key}_s"] = round(seconds, 3)
            row[f"{key}_mb_per_s"] = round(state_mib * 2**20 / 1e6 / seconds, 1)
            row[f"{key}_peak_rss_x_shard"] = round(max(r[key][1] / r["shard_mib"] for r in ranks), 2)
        rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "runs": rows}, indent=2))
    print(f"{'ranks':>5} {'state MiB':>9} {'max/rank MiB':>12} | {'sharded save':>14} {'dcp.save':>14} "
          f"{'rank-0 save':>14} {'restore':>14} | peak RSS ÷ shard: save, rank-0 save, restore")
    for r in rows:
        cell = lambda k: f"{r[k + '_s']:6.2f}s {r[k + '_mb_per_s']:5.0f}MB/s"  # noqa: E731
        print(f"{r['ranks']:>5} {r['state_mib']:>9} {r['max_bytes_written_by_one_rank_mib']:>12} | "
              f"{cell('runner_sharded_save')} {cell('dcp_save')} {cell('rank0_full_save')} {cell('runner_restore')} | "
              f"{r['runner_sharded_save_peak_rss_x_shard']}, {r['rank0_full_save_peak_rss_x_shard']}, "
              f"{r['runner_restore_peak_rss_x_shard']}")
    print(f"\nDDP (the whole state on every rank): {'ranks':>5} | {'rank 0 writes all':>18} "
          f"{'spread over ranks':>18} | max MiB by one rank")
    for r in rows:
        print(f"{'':37}{r['ranks']:>5} | {r['ddp_rank0_save_s']:17.2f}s {r['ddp_spread_save_s']:17.2f}s | "
              f"{r['ddp_spread_max_bytes_by_one_rank_mib']}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
