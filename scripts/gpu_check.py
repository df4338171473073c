"""The GPU check: every learner family, the meta-step benchmark and the multi-task overhead on a CUDA
device, in one run of at most about 8 minutes, written to a results file for BENCHMARKS.md.

    python scripts/gpu_check.py              # on a machine with CUDA: writes docs/bench_gpu.md
    python scripts/gpu_check.py --dry-run    # no CUDA needed: the same code paths on the CPU, tiny sizes

Sections (protocol fixed before any GPU run):

1. **Learner families.** MAML, first-order MAML, MAML++, iMAML, Reptile, ProtoNet (Omniglot 5-way
   1-shot, Conv4-64, T=32), the multi-task module (8 Omniglot alphabets, hard sharing, PCGrad on the
   parameters), TaskMet (the cubic top-k problem) and Task2Vec (both Fisher estimates of a Conv4 probe)
   each fit or run a few steps on the device, timed. For the meta-learners, the meta-gradient of one
   meta-batch under bf16 autocast is compared with float32: the relative error
   ``||g_bf16 - g_32|| / ||g_32||`` is reported against ``BF16_TOL`` (5e-2: bf16 keeps 8 bits of
   mantissa, a relative rounding of 4e-3 per operation, and the error grows along the inner loop);
   a learner outside it should train in float32 on that device. (On the CPU, Conv4-32, 4 tasks, the
   MAML family is at 0.2-0.65 -- bf16 rounding flips max-pool choices and BatchNorm statistics inside
   the inner loop -- and ProtoNet at 6e-3.)
2. **Meta-step benchmark, GPU section.** Second-order MAML, Conv4-64, Omniglot 5-way 1-shot (15
   queries per class, 1 inner step) and 20-way 1-shot (5 queries, 5 inner steps), T=32: tasklight's
   ``vmap`` and ``stacked`` strategies vs the per-task loop and learn2learn (where installed), the
   same batch and initial weights, interleaved rounds with ``torch.cuda.synchronize``; meta-gradients
   compared with the loop's; peak GPU memory of one meta-step per method.
3. **Multi-task overhead on the GPU.** ``scripts/bench_mtl_overhead.py``'s engines (loop, batched,
   ``func.vmap(vjp)``, torchjd) with peak GPU memory, and its step-time ratios to equal weighting for
   the methods with parameter and representation gradients.

Writes ``docs/bench_gpu.md`` (``--out``), headed with the device name; ``scripts/collect_benchmarks.py``
puts it into BENCHMARKS.md as GPU figures. The last line printed is
``SUMMARY device=<name> families_ok=<k>/<n> bf16_max_rel_err=<e> conv_loop_over_vmap=<x> ...``.
Exits non-zero when a family fails to run or a float32 gradient check is out of tolerance.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _meta_refs as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = "docs/bench_gpu.md"
BF16_TOL = 5e-2
GRAD_TOL = 1e-3  # float32 meta-gradients of the strategies vs the per-task loop (max abs diff / max abs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sizes(dry: bool) -> dict:
    """Everything that scales: the real check's sizes, or tiny ones for ``--dry-run``."""
    if dry:
        return dict(hidden=4, tasks=2, queries=2, queries20=1, steps20=1, fit_steps=2, rounds=2, mtl_hidden=4,
                    per_task=2, mtl_rounds=1, mtl_steps=1, t2v_examples=16, t2v_steps=3, taskmet_train=8,
                    mtl_methods=["equal", "pcgrad (representation)", "pcgrad (parameters)"])
    return dict(hidden=64, tasks=32, queries=15, queries20=5, steps20=5, fit_steps=5, rounds=10, mtl_hidden=32,
                per_task=8, mtl_rounds=3, mtl_steps=4, t2v_examples=256, t2v_steps=50, taskmet_train=200,
                mtl_methods=["equal", "pcgrad (representation)", "mgda (representation)", "pcgrad (parameters)",
                             "mgda (parameters)", "upgrad (parameters)"])


# ----------------------------------------------------------------------------- 1. learner families
def meta_learners(hidden: int) -> dict:
    from tasklight.meta.imaml import IMAMLModule
    from tasklight.meta.maml import MAMLModule
    from tasklight.meta.mamlpp import MAMLPlusPlusModule
    from tasklight.meta.proto import ProtoNetModule
    from tasklight.meta.reptile import ReptileModule
    from tasklight.nn.nets import Conv4

    def net(out=5):
        torch.manual_seed(0)
        return Conv4(1, out, hidden=hidden)

    return {
        "MAML": lambda: MAMLModule(net(), loss="cross_entropy", inner_steps=1, inner_lr=0.4),
        "FOMAML": lambda: MAMLModule(net(), loss="cross_entropy", inner_steps=1, inner_lr=0.4, first_order=True),
        "MAML++": lambda: MAMLPlusPlusModule(net(), inner_steps=2),
        "iMAML": lambda: IMAMLModule(net(), loss="cross_entropy", inner_steps=2, inner_lr=0.1, cg_steps=2),
        "Reptile": lambda: ReptileModule(net(), loss="cross_entropy", inner_steps=2, inner_lr=0.1),
        "ProtoNet": lambda: ProtoNetModule(net(0)),
    }


def fit_trainer(steps: int, accelerator: str):
    from lightning.pytorch import Trainer

    return Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   num_sanity_val_steps=0, default_root_dir=tempfile.mkdtemp(prefix="gpu_check_"))


def meta_grads(module, batch, autocast: bool, device: torch.device) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = module.meta_objective(batch).objective
    out.float().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in module.parameters()])


def check_families(device: torch.device, s: dict, dry: bool) -> list[dict]:
    from tasklight.data.omniglot import OmniglotDataModule

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    batch = R.omniglot_batch(5, s["tasks"], s["queries"], seed=1).to(device)
    for name, make in meta_learners(s["hidden"]).items():
        row = {"family": f"meta: {name}"}
        try:
            module = make().to(device)
            g32 = meta_grads(module, batch, False, device)
            g16 = meta_grads(module, batch, True, device)
            row["bf16_rel_err"] = float((g16 - g32).norm() / g32.norm().clamp_min(1e-30))
            dm = OmniglotDataModule(n_way=5, k_shot=1, q_queries=s["queries"], meta_batch_size=s["tasks"],
                                    batches_per_epoch=s["fit_steps"], val_episodes=2, test_episodes=2)
            t0 = time.perf_counter()
            fit_trainer(s["fit_steps"], accelerator).fit(make(), dm)
            row["fit_s"] = time.perf_counter() - t0
            row["ok"] = True
        except Exception as err:  # noqa: BLE001 - reported in the table, and the exit status
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:200]}")
            traceback.print_exc()
        rows.append(row)
        print(f"  {row}", flush=True)
    for name, run in (("multi-task: hard sharing, PCGrad (parameters)", fit_multitask),
                      ("TaskMet: cubic top-k", fit_taskmet), ("Task2Vec: Monte-Carlo and variational Fisher", run_task2vec)):
        row = {"family": name}
        try:
            t0 = time.perf_counter()
            run(device, accelerator, s)
            row.update(fit_s=time.perf_counter() - t0, ok=True)
        except Exception as err:  # noqa: BLE001
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:200]}")
            traceback.print_exc()
        rows.append(row)
        print(f"  {row}", flush=True)
    return rows


def fit_multitask(device, accelerator, s) -> None:
    from tasklight.data.multitask import OmniglotAlphabetsDataModule
    from tasklight.multitask import HardSharing, MultiTaskModule, PCGrad
    from tasklight.nn.nets import Conv4

    dm = OmniglotAlphabetsDataModule(batch_size_per_task=s["per_task"], steps_per_epoch=s["fit_steps"])
    model = MultiTaskModule(Conv4(out_features=0, hidden=s["mtl_hidden"]), architecture=HardSharing(),
                            weighting=PCGrad(grad_source="parameters"))
    fit_trainer(s["fit_steps"], accelerator).fit(model, dm)


def fit_taskmet(device, accelerator, s) -> None:
    import yaml

    from tasklight.config import from_config

    cfg = yaml.safe_load((REPO / "tasklight/configs/taskmet_cubic.yaml").read_text())
    cfg["model"]["init_args"].pop("optimizer", None)  # a CLI optimizer callable; the module's default (Adam) instead
    cfg["model"]["init_args"].update(first_inner_steps=5, inner_steps=2, cg_steps=2)
    cfg["data"]["init_args"].update(num_train=s["taskmet_train"], num_val=8, num_test=8)
    model, dm = from_config(cfg["model"]), from_config(cfg["data"])
    fit_trainer(s["fit_steps"], accelerator).fit(model, dm)


def run_task2vec(device, accelerator, s) -> None:
    from tasklight.task2vec import fisher_diagonal, variational_fisher
    from tasklight.task2vec.probe import set_batchnorm_stats
    from tasklight.nn.nets import Conv4

    batch = R.omniglot_batch(5, 1, max(1, s["t2v_examples"] // 5), seed=2)
    x, y = batch.query_x[0].to(device), batch.query_y[0].to(device)
    torch.manual_seed(0)
    probe = Conv4(1, 5, hidden=s["hidden"], track_running_stats=True).to(device)
    set_batchnorm_stats(probe, x, batch_size=64)
    probe.eval()
    names = [n for n, _ in probe.named_parameters() if n.endswith("weight") and "0.weight" in n or n == "head.weight"]
    a = fisher_diagonal(probe, x, names, engine="layers", generator=torch.Generator().manual_seed(0))
    b = fisher_diagonal(probe, x, names, engine="vmap", generator=torch.Generator().manual_seed(0))
    worst = max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in names)
    if worst > 1e-3:
        raise AssertionError(f"the two Monte-Carlo Fisher engines differ by {worst:.1e} on {device}")
    layers = [n.rsplit(".", 1)[0] for n in names]
    variational_fisher(probe, x, y, layers, steps=s["t2v_steps"], batch_size=len(x))


# ----------------------------------------------------------------------------- 2. meta-step benchmark
def meta_step_bench(device: torch.device, s: dict) -> list[dict]:
    rows = []
    for name, steps, queries in (("conv", 1, s["queries"]), ("conv20", s["steps20"], s["queries20"])):
        setting = R.make_setting(name, tasks=s["tasks"], steps=steps, hidden=s["hidden"], queries=queries)
        setting.batch = setting.batch.to(device)
        ref = setting.make_net().to(device)
        methods = ["tasklight:vmap", "tasklight:stacked", "loop"]
        if R.available("learn2learn") is None:
            methods.append("learn2learn")
        built = {m: R.make_method(m, setting, ref) for m in methods}
        for meth in built.values():
            if hasattr(meth, "module"):  # tasklight's module: its own buffers and parameters on the device too
                meth.module.to(device)
        for meth in built.values():
            meth.step()  # warm-up
        g_loop = built["loop"].grads()
        diffs = {m: R.compare(meth.grads(), g_loop) for m, meth in built.items()}
        memory = {}
        for m, meth in built.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            meth.step()
            sync(device)
            memory[m] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
        times = {m: [] for m in methods}
        for r in range(s["rounds"]):
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:
                sync(device)
                t0 = time.perf_counter()
                built[m].step()
                sync(device)
                times[m].append(time.perf_counter() - t0)
        for m in methods:
            ratios = [a / b for a, b in zip(times["loop"], times[m])]
            rows.append({"setting": setting.describe, "key": name, "method": m.replace("tasklight:", "tasklight "),
                         "median_ms": 1000 * statistics.median(times[m]), "loop_over": statistics.median(ratios),
                         "grad_diff": diffs[m], "peak_mib": memory[m]})
            print(f"  {rows[-1]}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 3. multi-task overhead
def mtl_bench(device: torch.device, s: dict) -> tuple[dict, list[list[str]]]:
    import bench_mtl_overhead as M

    etimes, diffs, memory, n_params = M.bench_engines(s["mtl_hidden"], max(2, s["mtl_rounds"] * 2), str(device),
                                                      s["per_task"], rss=False)
    names = s["mtl_methods"]
    times, per_round = M.bench_steps(names, s["mtl_hidden"], s["mtl_rounds"], s["mtl_steps"],
                                     "gpu" if device.type == "cuda" else "cpu", s["per_task"])
    engines = [[n, f"{1000 * statistics.median(etimes[n]):.1f}",
                f"{statistics.median([a / b for a, b in zip(etimes[n], etimes['loop'])]):.2f}",
                "--" if n == "equal" else f"{diffs[n]:.1e}", f"{memory[n]:.1f}"] for n in M.ENGINE_ARMS]
    steps = [[n, f"{1000 * statistics.median(times[n]):.1f}", f"{statistics.fmean(per_round[n]):.2f}"] for n in names]
    return {"engines": engines, "steps": steps, "n_params": n_params,
            "max_param": max(statistics.fmean(per_round[n]) for n in names if "(parameters)" in n),
            "grads_ok": all(d <= 1e-3 for d in diffs.values())}, []


# ----------------------------------------------------------------------------- main
def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no CUDA: the same code paths on the CPU at tiny sizes")
    p.add_argument("--out", default=None, help=f"the results file (default {OUT}; with --dry-run a temporary file)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run to exercise the code paths on the CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.set_num_threads(1 if args.dry_run else min(8, os.cpu_count() or 1))
    s = sizes(args.dry_run)
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    start = time.perf_counter()
    print("[1/3] learner families", flush=True)
    families = check_families(device, s, args.dry_run)
    print(f"[2/3] meta-step benchmark ({time.perf_counter() - start:.0f} s)", flush=True)
    meta = meta_step_bench(device, s)
    print(f"[3/3] multi-task overhead ({time.perf_counter() - start:.0f} s)", flush=True)
    mtl, _ = mtl_bench(device, s)
    total = time.perf_counter() - start
    ok = sum(r["ok"] for r in families)
    bf16 = [r["bf16_rel_err"] for r in families if "bf16_rel_err" in r]
    bf16_ok = sum(e <= BF16_TOL for e in bf16)
    grads_ok = all(r["grad_diff"] <= GRAD_TOL for r in meta if r["method"] != "learn2learn") and mtl["grads_ok"]
    over = {k: next((r["loop_over"] for r in meta if r["key"] == k and r["method"] == "tasklight vmap"), float("nan"))
            for k in ("conv", "conv20")}
    kind = "dry run on the CPU at tiny sizes (not GPU figures)" if args.dry_run else f"GPU figures: {name}"
    lines = [f"# GPU check ({kind})", "",
             f"Command: `python scripts/gpu_check.py{' --dry-run' if args.dry_run else ''}`  ",
             f"Date: {datetime.date.today().isoformat()}  ",
             f"Machine: {kind}; torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if not args.dry_run else "") + f"; total time {total:.0f} s.", "",
             "## Learner families on the device", "",
             f"Each fits {s['fit_steps']} steps; meta-learners: relative error of the bf16-autocast meta-gradient "
             f"against float32 on one meta-batch (tolerance {BF16_TOL}).", ""]
    lines += table(["family", "fit (s)", "bf16 vs float32 (rel. err.)", f"bf16 within {BF16_TOL}", "status"],
                   [[r["family"], f"{r.get('fit_s', float('nan')):.1f}",
                     f"{r['bf16_rel_err']:.1e}" if "bf16_rel_err" in r else "--",
                     ("yes" if r["bf16_rel_err"] <= BF16_TOL else "no") if "bf16_rel_err" in r else "--",
                     "ok" if r["ok"] else f"FAILED {r.get('error', '')}"] for r in families])
    lines += ["", "## Meta-step benchmark (second-order MAML, GPU section)", "",
              f"Interleaved rounds ({s['rounds']}), `torch.cuda.synchronize` around each step; ratio = per-task "
              f"loop time / method time (median of per-round ratios); gradients: max abs difference to the "
              f"loop's / its max (tolerance {GRAD_TOL}); peak memory of one meta-step.", ""]
    for key in ("conv", "conv20"):
        rows = [r for r in meta if r["key"] == key]
        lines += [f"{rows[0]['setting']}:", ""]
        lines += table(["method", "median (ms)", "loop / method", "grad diff to loop", "peak GPU memory (MiB)"],
                       [[r["method"], f"{r['median_ms']:.1f}", f"{r['loop_over']:.2f}x", f"{r['grad_diff']:.1e}",
                         f"{r['peak_mib']:.0f}"] for r in rows]) + [""]
    lines += ["## Multi-task overhead on the device", "",
              f"Hard sharing, 8 Omniglot alphabets, Conv4 width {s['mtl_hidden']}, {s['per_task']} images per "
              f"task; per-task gradient engines (Jacobian [8, {mtl['n_params']}]; memory: peak GPU memory rise "
              f"on CUDA, not measured on the CPU here: see docs/bench_multitask.md):", ""]
    lines += table(["engine", "median (ms)", "ratio to loop", "max rel. diff to the float64 loop", "peak memory (MiB)"],
                   mtl["engines"]) + ["", "Step time, ratio to equal weighting (mean over rounds):", ""]
    lines += table(["method", "median step (ms)", "ratio to equal"], mtl["steps"]) + [""]
    summary = (f"SUMMARY device={name.replace(' ', '_')} families_ok={ok}/{len(families)} "
               f"bf16_within_tol={bf16_ok}/{len(bf16)} bf16_max_rel_err={max(bf16, default=0.0):.1e} "
               f"conv_loop_over_vmap={over['conv']:.2f} conv20_loop_over_vmap={over['conv20']:.2f} "
               f"max_param_overhead={mtl['max_param']:.2f} grads_match={'true' if grads_ok else 'false'}")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "bench_gpu.md" if args.dry_run else REPO / OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines + ["```", summary, "```", ""]))
    print("\n".join(lines))
    print(f"wrote {out} ({total:.0f} s)")
    print(summary)
    return 0 if ok == len(families) and grads_ok else 1


if __name__ == "__main__":
    sys.exit(main())
