"""World-size-2 checks of the run lock and the guard's parameter check, run by ``torchrun
--nproc_per_node 2`` from test_locks.py.

The run lock: rank 0 takes it, rank 1 learns it (one lock file, rank 0's pid); a second lock of
the folder is refused on both ranks with the same message.  The parameter check under ZeRO-3:
each rank holds half of every parameter; a NaN put into rank 1's half only is reported on both
ranks, and the norm is that of the whole parameters.  argv: output folder (rank r writes r.json).
"""
import json
import os
import sys

import torch


def main(out_dir: str) -> None:
    import deepspeed

    from tspo_fast.training.distributed import barrier, init_distributed, rank
    from tspo_fast.training.guard import parameter_health
    from tspo_fast.training.locks import RunLockError, lock_output_dir

    init_distributed()
    r = rank()
    result = {"rank": r, "pid": os.getpid()}
    folder = os.path.join(out_dir, "run")
    lock = lock_output_dir(folder)
    result["holds_lock"] = lock is not None
    barrier()
    try:
        lock_output_dir(folder)
        result["second"] = None
    except RunLockError as e:
        result["second"] = str(e)
    barrier()

    torch.manual_seed(0)                         # the same model on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    full = float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    norm, bad = parameter_health(engine.module)
    result["norm"], result["full_norm"], result["bad_before"] = norm, full, bad
    weight = engine.module[0].weight
    result["shard"] = int(weight.ds_tensor.numel())
    if r == 1:
        weight.ds_tensor.data[3] = float("nan")
    norm, bad = parameter_health(engine.module)
    result["bad_after"] = bad
    barrier()
    if lock is not None:
        lock.release()
    with open(os.path.join(out_dir, f"{r}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _worker import run_worker
    run_worker(main, sys.argv[1])
