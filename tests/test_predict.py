"""`predict` for every learner family: adapted / per-task / decision predictions on the predict split."""
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import TensorDataset

from tasklight import MLP, DecisionDataModule, MSEModule, MultiTaskModule
from tasklight.data import MultiTaskDataModule
from tasklight.taskmet.problems import CubicTopK


def _trainer():
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   inference_mode=False)


def _sets(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(2)]


def test_multitask_predict_gives_each_example_its_own_tasks_output():
    seed_everything(0)
    data = MultiTaskDataModule(train_sets=_sets(8, 0), val_sets=_sets(4, 1), test_sets=_sets(6, 2),
                               batch_size_per_task=4, steps_per_epoch=1, eval_batch_size=12)
    model = MultiTaskModule(MLP(4, [8], 6))
    out = _trainer().predict(model, data)
    batch = next(iter(data.predict_dataloader()))
    assert sorted(out[0]["task"]) == [0, 1]
    for preds, t, rows in zip(out[0]["predictions"], out[0]["task"], out[0]["rows"]):
        torch.testing.assert_close(preds, model(batch.x[rows], t))


def test_decision_learner_predict_returns_the_predictor_outputs():
    seed_everything(0)
    data = DecisionDataModule(CubicTopK(num_items=10), num_train=8, num_val=4, num_test=6)
    model = MSEModule(MLP(1, [4], 1), problem=data.problem)
    out = _trainer().predict(model, data)
    x = next(iter(data.predict_dataloader()))[0]
    torch.testing.assert_close(out[0], model(x))
