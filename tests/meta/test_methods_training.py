"""Short real training runs of ANIL, BOIL, MAML++, Reptile, ProtoNet and ProtoMAML: meta-training must help."""
import functools

import pytest
import torch
from lightning.pytorch import Trainer

from tasklight.data.omniglot import OmniglotDataModule
from tasklight.data.sinusoid import SinusoidDataModule
from tasklight.meta import MAMLModule, MAMLPlusPlusModule, ProtoMAMLModule, ProtoNetModule, ReptileModule
from tasklight.nn.nets import MLP, Conv4


def trainer(**kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, inference_mode=False)
    args.update(kw)
    return Trainer(**args)


def adam(lr):
    return functools.partial(torch.optim.Adam, lr=lr)


SINUSOID = {
    "anil": lambda: MAMLModule(MLP(1, [40, 40], 1), inner_steps=1, inner_lr=0.05, eval_inner_steps=5,
                               adapt=["net.4"], optimizer=adam(3e-3)),
    "boil": lambda: MAMLModule(MLP(1, [40, 40], 1), inner_steps=1, inner_lr=0.01, eval_inner_steps=5,
                               adapt=["net.0", "net.2"], optimizer=adam(3e-3)),
    "mamlpp": lambda: MAMLPlusPlusModule(MLP(1, [40, 40], 1), loss="mse", inner_steps=2, inner_lr=0.01,
                                         eval_inner_steps=5, optimizer=adam(3e-3)),
    "reptile": lambda: ReptileModule(MLP(1, [40, 40], 1), inner_steps=5, inner_lr=0.02, eval_inner_steps=5,
                                     optimizer=functools.partial(torch.optim.SGD, lr=0.5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SINUSOID))
def test_sinusoid_meta_training_lowers_post_adaptation_mse(name):
    torch.manual_seed(0)
    module = SINUSOID[name]()
    dm = SinusoidDataModule(k_shot=10, q_queries=10, meta_batch_size=10, batches_per_epoch=300, test_episodes=100,
                            eval_batch_size=50)
    untrained = trainer().test(module, dm, verbose=False)[0]
    trainer(max_steps=300).fit(module, dm)
    res = trainer().test(module, dm, verbose=False)[0]
    assert res["test/mse@5"] < 0.75 * untrained["test/mse@5"], (untrained, res)
    assert res["test/mse@5"] < res["test/mse@0"], res  # adaptation helps the meta-trained model


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ProtoNetModule, ProtoMAMLModule])
def test_prototype_learners_beat_chance_on_omniglot_5way(cls):
    torch.manual_seed(0)
    kw = dict(inner_steps=1, inner_lr=0.1) if cls is ProtoMAMLModule else {}
    module = cls(Conv4(1, 0, hidden=16), optimizer=adam(3e-3), **kw)
    dm = OmniglotDataModule(n_way=5, k_shot=1, q_queries=5, meta_batch_size=4, batches_per_epoch=30,
                            test_episodes=60, eval_batch_size=20)
    before = trainer().test(module, dm, verbose=False)[0]
    trainer(max_steps=30).fit(module, dm)
    res = trainer().test(module, dm, verbose=False)[0]
    assert res["test/acc"] > 0.5, res  # chance is 0.2
    assert res["test/acc"] > before["test/acc"] + 0.05, (before, res)
