"""Short real training runs, evaluation, predict_episode, non-finite handling, checkpoint/resume, W&B."""
import functools
import glob

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from _recorders import RecordRun
from _wandb import offline_run_records
from tasklight.data.batch import MetaBatch
from tasklight.data.omniglot import OmniglotDataModule
from tasklight.data.sinusoid import SinusoidDataModule
from tasklight.meta.imaml import IMAMLModule
from tasklight.meta.maml import MAMLModule
from tasklight.nn.nets import MLP, Conv4


def trainer(tmp_path=None, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, inference_mode=False)
    args.update(kw)
    return Trainer(**args)


def adam(lr):
    return functools.partial(torch.optim.Adam, lr=lr)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [MAMLModule, IMAMLModule])
def test_sinusoid_training_lowers_post_adaptation_mse(cls):
    torch.manual_seed(0)
    kw = dict(lam=0.5, cg_steps=5, cg_damping=0.5) if cls is IMAMLModule else {}
    module = cls(MLP(1, [40, 40], 1), inner_steps=10 if cls is IMAMLModule else 1, inner_lr=0.01,
                 eval_inner_steps=5, extra_eval_steps=[0], optimizer=adam(3e-3), **kw)
    dm = SinusoidDataModule(k_shot=10, q_queries=10, meta_batch_size=10, batches_per_epoch=300, test_episodes=100,
                            eval_batch_size=50)
    untrained = trainer().test(module, dm, verbose=False)[0]
    trainer(max_steps=300).fit(module, dm)
    res = trainer().test(module, dm, verbose=False)[0]
    # adaptation helps a lot after meta-training, and meta-training made the adapted MSE better
    ratio = 0.6 if cls is MAMLModule else 0.75
    assert res["test/mse@5"] < ratio * res["test/mse@0"]
    assert res["test/mse@5"] < ratio * untrained["test/mse@5"]
    assert res["test/mse@5_ci95"] > 0


@pytest.mark.slow
def test_omniglot_5way_1shot_beats_chance():
    torch.manual_seed(0)
    module = MAMLModule(Conv4(1, 5, hidden=32), loss="cross_entropy", inner_steps=1, inner_lr=0.4,
                        extra_eval_steps=[0], optimizer=adam(3e-3))
    dm = OmniglotDataModule(n_way=5, k_shot=1, q_queries=5, meta_batch_size=8, batches_per_epoch=30,
                            test_episodes=60, eval_batch_size=20)
    trainer(max_steps=30).fit(module, dm)
    res = trainer().test(module, dm, verbose=False)[0]
    assert res["test/acc"] > 0.45, res  # chance is 0.2
    assert res["test/acc"] > res["test/acc@0"] + 0.1


def test_predict_episode_shapes_and_errors():
    torch.manual_seed(0)
    module = MAMLModule(Conv4(1, 5, hidden=8), loss="cross_entropy", inner_steps=1, inner_lr=0.4)
    sx, sy, qx = torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(7, 1, 28, 28)
    out = module.predict_episode(sx, sy, qx)
    assert out.shape == (7, 5)
    batched = module.predict_episode(sx[None].repeat(3, 1, 1, 1, 1), sy[None].repeat(3, 1), qx[None].repeat(3, 1, 1, 1, 1),
                                     steps=2)
    assert batched.shape == (3, 7, 5)
    with torch.no_grad():  # adaptation still works under no_grad
        assert torch.allclose(module.predict_episode(sx, sy, qx), out, atol=1e-6)
    # adaptation changes predictions; steps=0 is the unadapted network
    assert not torch.allclose(module.predict_episode(sx, sy, qx, steps=0), out)
    with pytest.raises(ValueError, match="support_y"):
        module.predict_episode(sx, sy[:3], qx)
    with pytest.raises(ValueError, match="features"):
        module.predict_episode(sx, sy, torch.rand(7, 1, 14, 14))
    with pytest.raises(ValueError, match="examples have 3 dims"):
        module.predict_episode(torch.rand(5, 28, 28), sy, torch.rand(7, 28, 28))
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        with torch.inference_mode():
            module.predict_episode(sx, sy, qx)
    # regression: values come back (through loss.predict when the loss has one)
    reg = IMAMLModule(MLP(), inner_steps=2)
    assert reg.predict_episode(torch.rand(5, 1), torch.rand(5, 1), torch.rand(9, 1)).shape == (9, 1)


class _Fixed(torch.utils.data.IterableDataset):
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        yield self.batch


def _nan_batch(dm):
    b = next(iter(dm.train_dataloader()))
    b.support_y[0, 0] = float("nan")
    return b


def test_nonfinite_inner_loss_raises_or_skips():
    dm = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=3)
    bad = _nan_batch(dm)

    class OneBatch(SinusoidDataModule):
        def train_dataloader(self):
            return DataLoader(_Fixed(bad), batch_size=None)

    torch.manual_seed(0)
    module = MAMLModule(MLP(), inner_steps=1)
    with pytest.raises(FloatingPointError, match="non-finite inner loss at task 0.*nonfinite='skip'"):
        trainer(max_steps=1).fit(module, OneBatch())
    torch.manual_seed(0)
    module = MAMLModule(MLP(), inner_steps=1, nonfinite="skip")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    t = trainer(max_steps=1, max_epochs=1)
    t.fit(module, OneBatch())
    assert int(module.skipped_steps) == 1
    for k, v in module.state_dict().items():
        if k not in ("skipped_steps", "consecutive_skips"):
            assert torch.equal(v, before[k]), k  # parameters untouched, not corrupted
    assert len(t.optimizers[0].state) == 0  # the optimiser never stepped


def _fit(tmp_path, max_steps, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [16, 16], 1), inner_steps=2, inner_lr=0.05, optimizer=adam(1e-2))
    dm = SinusoidDataModule(k_shot=5, q_queries=5, meta_batch_size=4, batches_per_epoch=3, seed=5)
    t = trainer(max_steps=max_steps, enable_checkpointing=True, callbacks=list(callbacks),
                default_root_dir=str(tmp_path))
    t.fit(module, dm, ckpt_path=ckpt_path)
    return module, t


@pytest.mark.parametrize("stop_at", [3, 4])  # at an epoch boundary and in the middle of an epoch
def test_checkpoint_resume_reproduces_the_next_meta_steps(tmp_path, stop_at):
    full, _ = _fit(tmp_path / "full", max_steps=stop_at + 2)
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=stop_at, save_top_k=-1)
    _fit(tmp_path / "part", max_steps=stop_at, callbacks=[ck])
    path = glob.glob(str(tmp_path / "ck" / f"*step={stop_at}.ckpt"))[0]
    rec = RecordRun(str(tmp_path))
    resumed, t = _fit(tmp_path / "resumed", max_steps=stop_at + 2, ckpt_path=path, callbacks=[rec])
    assert [int(b.index[0]) for b in rec.batches] == [stop_at, stop_at + 1]  # the sampler continued
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-7), k
    # and the resumed steps really moved the weights (the checkpoint is not simply the end state)
    assert t.global_step == stop_at + 2


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:
        wandb.finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    module = MAMLModule(MLP(1, [8], 1), inner_steps=1)
    dm = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=4, val_episodes=4)
    logger = WandbLogger(project="tasklight-test", save_dir=str(tmp_path), name="offline-check")
    t = trainer(max_steps=4, logger=logger, log_every_n_steps=1, limit_val_batches=None, val_check_interval=4)
    t.fit(module, dm)
    run_dir = logger.experiment.dir
    run, blob = offline_run_records(tmp_path, (b"train/query_loss", b"val/mse"))
    assert run_dir.startswith(run)


def test_gradient_clipping_and_scheduler_are_applied_each_meta_step():
    from lightning.pytorch import Callback

    norms = []

    class RecordNorm(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in pl_module.parameters()
                                              if p.grad is not None))))

    torch.manual_seed(0)
    module = MAMLModule(MLP(), inner_steps=1, clip_grad_norm=1e-3, optimizer=adam(0.1),
                        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    dm = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=3)
    t = trainer(max_steps=3, callbacks=[RecordNorm()])
    t.fit(module, dm)
    assert len(norms) == 3 and max(norms) <= 1e-3 * (1 + 1e-4)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
