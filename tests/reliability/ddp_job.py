"""A small job run as its own process by test_distributed.py (``ddp`` re-runs this file per rank).

    python ddp_job.py ci <strategy> <out.json>       test a fixed MAML model, write mean and CI
    python ddp_job.py dead_rank <strategy> <timeout>  rank 1 is SIGKILLed 3 s into training
"""
import json
import os
import signal
import sys
import threading

import torch
from lightning.pytorch import Callback, Trainer

from tasklight import MAMLModule, MLP, SinusoidDataModule
from tasklight.strategies import TimedDDPStrategy


class KillRankOne(Callback):
    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGKILL)).start()


def main():
    torch.set_num_threads(1)
    job, strategy = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [8], 1), inner_steps=1, inner_lr=0.01)
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=4, batches_per_epoch=10**6, val_episodes=10,
                            test_episodes=50, eval_batch_size=25, seed=3)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, inference_mode=False, num_sanity_val_steps=0, limit_val_batches=0)
    if job == "ci":
        kw = dict(devices=1) if strategy == "single" else dict(devices=2, strategy=strategy)
        res = Trainer(**common, **kw).test(module, dm, verbose=False)[0]
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(sys.argv[3], "w") as f:
                json.dump(res, f)
    elif job == "dead_rank":
        start = {"ddp": "popen", "ddp_spawn": "spawn"}[strategy]
        trainer = Trainer(**common, devices=2, max_steps=10**6, callbacks=[KillRankOne()],
                          strategy=TimedDDPStrategy(start, process_group_timeout=float(sys.argv[3])))
        trainer.fit(module, dm)
        print("training ended normally", flush=True)  # never reached: the run must fail


if __name__ == "__main__":
    main()
