"""Task2Vec: Fisher estimates against explicit loops, distances against their definitions, Omniglot
alphabets on a trained probe, the callback in a real run, the script, and clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasklight.nn.nets import MLP, Conv4
from tasklight.task2vec import (
    Task2Vec, TaskEmbedding, asymmetric_distance, distance_matrix, fisher_diagonal, load_embeddings, per_filter,
    rank_experts, save_embeddings, set_batchnorm_stats, symmetric_distance, task_descriptors,
    transfer_error, trivial_embedding)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small per-example-gradient workloads run faster on one thread than on two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_conv(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.Tanh(), nn.Linear(5, classes))


def loop_sq_grads(model: nn.Module, names: list[str], x: torch.Tensor, label_sets: list[list[int]],
                  weights: list[list[float]]) -> tuple[dict, dict]:
    """Explicit per-example, per-label autograd: weighted sum and sum of squares of grad^2."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    total_sq = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for i in range(len(x)):
        for y, w in zip(label_sets[i], weights[i]):
            logp = F.log_softmax(model(x[i: i + 1]), -1)[0, y]
            grads = torch.autograd.grad(logp, [params[n] for n in names])
            for n, g in zip(names, grads):
                sq = g.double() ** 2
                total[n] += w * sq
                total_sq[n] += w * sq ** 2
    return total, total_sq


@pytest.fixture(scope="module")
def bn_model():
    model = small_conv()
    x = torch.randn(8, 1, 6, 6)
    set_batchnorm_stats(model, x, batch_size=5)  # eval mode, fixed statistics: examples are independent
    return model, x


def test_exact_fisher_equals_explicit_loop_over_examples_and_labels(bn_model):
    model, x = bn_model
    names = ["0.weight", "1.weight", "4.weight"]
    ours = fisher_diagonal(model, x, names, exact=True, batch_size=5)
    probs = F.softmax(model(x), -1).detach()
    total, _ = loop_sq_grads(model, names, x, [list(range(3))] * len(x), probs.double().tolist())
    for n in names:
        torch.testing.assert_close(ours[n].double(), total[n] / len(x), rtol=1e-5, atol=1e-9)


def test_layer_engine_equals_vmap_engine_and_the_loop_on_given_labels():
    """One forward/backward per batch (per-example conv gradients from one grouped convolution) against
    torch.func per example and the explicit loop, on strided, padded, dilated convs with biases."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 2, dilation=2, padding=(1, 0)), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(7, 2, 9, 9)
    model(x)
    set_batchnorm_stats(model, x, batch_size=4)
    names = ["0.weight", "0.bias", "1.weight", "3.weight", "3.bias", "5.weight", "5.bias"]
    labels = torch.randint(0, 4, (7, 2), generator=torch.Generator().manual_seed(5))
    total, _ = loop_sq_grads(model, names, x, labels.tolist(), [[1.0, 1.0]] * len(x))
    for engine in ("auto", "vmap"):
        got = fisher_diagonal(model, x, names, mc_samples=2, labels=labels, engine=engine, batch_size=3)
        for n in names:
            torch.testing.assert_close(got[n].double(), total[n] / 14, rtol=1e-5, atol=1e-9, msg=f"{engine} {n}")
    layers = [n for n in names if not n.startswith("1.")]
    got = fisher_diagonal(model, x, layers, exact=True, engine="layers")  # weighted by the class probabilities
    probs = F.softmax(model(x), -1).detach()
    exact, _ = loop_sq_grads(model, layers, x, [list(range(4))] * len(x), probs.double().tolist())
    for n in layers:
        torch.testing.assert_close(got[n].double(), exact[n] / len(x), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="engine='layers' handles"):
        fisher_diagonal(model, x, ["1.weight"], engine="layers")
    with pytest.raises(ValueError, match="engine must be"):
        fisher_diagonal(model, x, layers, engine="hooks")
    with pytest.raises(ValueError, match=r"labels must have shape"):
        fisher_diagonal(model, x, layers, labels=labels[:3])
    with pytest.raises(ValueError, match="exact=True"):
        fisher_diagonal(model, x, layers, labels=labels, exact=True)


def test_layer_engine_on_a_linear_layer_applied_at_several_positions_equals_the_loop():
    """A linear layer on [N, L, in] inputs has a per-example gradient summed over positions (the batched product
    path), the head on [N, in] the closed form (d^2)^T a^2; both against the explicit loop, plain and weighted."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(6, 2, 3)
    names = ["0.weight", "0.bias", "3.weight", "3.bias"]
    labels = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    total, _ = loop_sq_grads(model, names, x, [[int(c)] for c in labels], [[1.0]] * len(x))
    got = fisher_diagonal(model, x, names, labels=labels, engine="layers", batch_size=4)
    probs = F.softmax(model(x), -1).detach()
    exact, _ = loop_sq_grads(model, names, x, [list(range(3))] * len(x), probs.double().tolist())
    weighted = fisher_diagonal(model, x, names, exact=True, engine="layers")
    for n in names:
        torch.testing.assert_close(got[n].double(), total[n] / len(x), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(weighted[n].double(), exact[n] / len(x), rtol=1e-5, atol=1e-9)


def test_monte_carlo_fisher_same_labels_matches_loop_and_is_within_mc_tolerance(bn_model):
    model, x = bn_model
    names = ["0.weight", "4.weight"]
    samples = 40
    ours = fisher_diagonal(model, x, names, mc_samples=samples, batch_size=len(x) * samples,
                           generator=torch.Generator().manual_seed(3))
    # the same labels: one batch, sampled from the model's predictive distribution with the same seed
    probs = F.softmax(model(x), -1).detach()
    labels = torch.multinomial(probs, samples, replacement=True, generator=torch.Generator().manual_seed(3))
    total, total_sq = loop_sq_grads(model, names, x, labels.tolist(), [[1.0] * samples] * len(x))
    m = len(x) * samples
    for n in names:
        torch.testing.assert_close(ours[n].double(), total[n] / m, rtol=1e-5, atol=1e-9)
    # other labels (another seed): the estimate agrees with the exact Fisher within Monte-Carlo error
    # (standard error from the loop's per-sample squared gradients)
    other = fisher_diagonal(model, x, names, mc_samples=samples, generator=torch.Generator().manual_seed(11))
    exact = fisher_diagonal(model, x, names, exact=True)
    for n in names:
        mean = total[n] / m
        se = ((total_sq[n] / m - mean ** 2).clamp_min(0) / m).sqrt()
        for estimate in (mean, other[n].double()):
            assert ((estimate - exact[n].double()).abs() <= 6 * se + 1e-9).all()
        rel = (per_filter(other[n]) - per_filter(exact[n])).norm() / per_filter(exact[n]).norm()
        assert rel < 0.25  # the per-filter embedding of this layer


def test_embedding_shape_probe_untouched_and_label_permutation_invariant():
    probe = Conv4(out_features=4, hidden=8, image_size=16)
    probe.train()
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    torch.manual_seed(1)
    x = torch.rand(40, 1, 16, 16)
    y = torch.arange(40) % 4
    t2v = Task2Vec(probe, exact=True, batch_size=16)
    assert t2v.layers == ["features.0.0", "features.1.0", "features.2.0", "features.3.0"]
    e = t2v.embed((x, y), "a")
    assert e.vector.shape == (32,) and e.layer_sizes == [8, 8, 8, 8] and (e.vector >= 0).all()
    assert e.meta["num_classes"] == 4 and e.meta["num_examples"] == 40
    assert probe.training and all(torch.equal(before[k], v) for k, v in probe.state_dict().items())
    relabelled = t2v.embed((x, (y * 3 + 2) % 4 + 10), "b")  # a bijection to other label ids
    torch.testing.assert_close(relabelled.vector, e.vector, rtol=5e-3, atol=1e-6)
    again = Task2Vec(probe, exact=True, batch_size=5).embed((x, y))  # batch size does not matter
    assert symmetric_distance(again, e) < 1e-3
    # the Monte-Carlo embedding is reproducible with its seed
    mc = Task2Vec(probe, mc_samples=2, seed=5)
    torch.testing.assert_close(mc.embed((x, y)).vector, mc.embed((x, y)).vector)


# ------------------------------------------------------------------------------------- distances
def explicit_dsym(a, b):
    a, b = a.double(), b.double()
    u, v = a / (a + b), b / (a + b)
    return 1 - float((u @ v) / (u.norm() * v.norm()))


def test_symmetric_distance_definition_and_properties():
    g = torch.Generator().manual_seed(0)
    vs = [torch.rand(20, generator=g) ** 3 + 1e-3 for _ in range(6)]
    for a in vs:
        assert symmetric_distance(a, a) == pytest.approx(0.0, abs=1e-12)
        assert symmetric_distance(a, 7.5 * a) == pytest.approx(0.0, abs=1e-12)  # proportional Fishers
        for b in vs:
            d = symmetric_distance(a, b)
            assert d == pytest.approx(symmetric_distance(b, a), abs=1e-15)
            assert 0.0 <= d <= 1.0
            assert d == pytest.approx(explicit_dsym(a, b), rel=1e-9, abs=1e-12)
    # extremes: disjoint supports are at distance 1; shared zeros count as agreement
    assert symmetric_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(1.0)
    assert symmetric_distance(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(0.0)
    assert symmetric_distance(torch.zeros(3), torch.zeros(3)) == 0.0
    assert symmetric_distance(torch.zeros(3), torch.ones(3)) == 1.0
    m = distance_matrix(vs)
    assert m.shape == (6, 6) and torch.equal(m, m.T) and (m.diagonal() == 0).all()
    assert float(m[1, 4]) == pytest.approx(explicit_dsym(vs[1], vs[4]), rel=1e-6)


def test_asymmetric_distance_and_trivial_embedding():
    g = torch.Generator().manual_seed(1)
    layers, sizes = ["l1", "l2"], [4, 6]
    es = [TaskEmbedding(torch.rand(10, generator=g) + 0.01, layers, sizes, f"t{i}") for i in range(4)]
    t0 = trivial_embedding(es)
    stacked = torch.stack([e.vector for e in es]).mean(0)
    assert torch.allclose(t0.layer("l1"), stacked[:4].mean().expand(4))
    assert torch.allclose(t0.layer("l2"), stacked[4:].mean().expand(6))
    a, b = es[0], es[1]
    for alpha in (0.0, 0.15, 1.0):
        want = explicit_dsym(a.vector, b.vector) - alpha * explicit_dsym(a.vector, t0.vector)
        assert asymmetric_distance(a, b, t0, alpha) == pytest.approx(want, rel=1e-6)
    assert asymmetric_distance(a, b, t0, 0.0) == pytest.approx(symmetric_distance(a, b))
    m = distance_matrix(es, "asymmetric", alpha=0.15, trivial=t0)
    for i in range(4):
        for j in range(4):
            assert float(m[i, j]) == pytest.approx(asymmetric_distance(es[i], es[j], t0, 0.15) if i != j
                                                   else -0.15 * symmetric_distance(es[i], t0), rel=1e-5, abs=1e-7)
    # a complex source (far from trivial) is brought closer than an equally distant simple one
    flat = TaskEmbedding(torch.ones(10), layers, sizes)
    ranking = rank_experts(b, {e.name: e for e in es[2:]} | {"flat": flat}, alpha=0.15, trivial=t0)
    want = sorted(["t2", "t3", "flat"], key=lambda n: asymmetric_distance(
        {"t2": es[2], "t3": es[3], "flat": flat}[n], b, t0, 0.15))
    assert ranking.experts == want and ranking.chosen == want[0]
    assert ranking.distances == sorted(ranking.distances)


def test_descriptors_and_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    es = [TaskEmbedding(torch.rand(6, generator=g) * 10 ** torch.arange(6.0), ["a", "b"], [2, 4], f"t{i}",
                        {"num_classes": 5}) for i in range(3)]
    z = task_descriptors(es)
    assert z.shape == (3, 6)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    assert torch.allclose(task_descriptors(es, "l2").norm(dim=1), torch.ones(3))
    out = save_embeddings(tmp_path / "e.pt", es)
    assert out["descriptors"].shape == (3, 6) and out["distance_symmetric"].shape == (3, 3)
    back = load_embeddings(tmp_path / "e.pt")
    assert [e.name for e in back] == ["t0", "t1", "t2"] and back[1].layer_sizes == [2, 4]
    torch.testing.assert_close(back[2].vector, es[2].vector)


# ------------------------------------------------------------------------------------- errors
def test_clear_errors_for_bad_input():
    probe = MLP(4, (8,), 3)
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="no layer 'features.0'.*submodules are"):
        Task2Vec(probe, layers=["features.0"])
    with pytest.raises(ValueError, match="classifier head"):
        Task2Vec(probe, layers=["net.2"])
    with pytest.raises(ValueError, match="no network submodule 'trunk'"):
        Task2Vec(probe, network="trunk")
    t2v = Task2Vec(probe)
    with pytest.raises(ValueError, match="single class"):
        t2v.embed((x, torch.zeros(10, dtype=torch.long)), "one")
    with pytest.raises(ValueError, match="empty"):
        t2v.embed((x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        t2v.embed(torch.utils.data.TensorDataset(x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        t2v.embed(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0])))
    with pytest.raises(ValueError, match="integer class ids"):
        t2v.embed((x, y.float()))
    with pytest.raises(ValueError, match="floating point"):
        t2v.embed((x.long(), y))
    with pytest.raises(ValueError, match="not the network's final operation"):
        Task2Vec(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh())).embed((x, y))
    with pytest.raises(ValueError, match="different lengths"):
        symmetric_distance(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="negative"):
        symmetric_distance(torch.tensor([1.0, -1.0]), torch.ones(2))
    with pytest.raises(ValueError, match="bn_stats='probe'"):
        Task2Vec(Conv4(out_features=3, hidden=4, image_size=16), bn_stats="probe").embed(
            (torch.rand(6, 1, 16, 16), torch.arange(6) % 3))
    # a Dataset and a DataLoader give the same embedding as tensors
    ds = torch.utils.data.TensorDataset(x, y)
    e1 = Task2Vec(probe, exact=True).embed((x, y))
    e2 = Task2Vec(probe, exact=True).embed(torch.utils.data.DataLoader(ds, batch_size=3))
    torch.testing.assert_close(e1.vector, e2.vector)


def test_transfer_error_fits_a_head_on_frozen_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(90) % 3
    x = centers[y] + 0.3 * torch.randn(90, 2, generator=g)
    expert = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 7))
    with torch.no_grad():
        expert[0].weight.copy_(torch.eye(2))
        expert[0].bias.zero_()
    assert transfer_error(expert, (x[:45], y[:45] + 5), (x[45:], y[45:] + 5)) == 0.0
    # features that ignore the input carry no information: chance-level error
    with torch.no_grad():
        expert[0].weight.zero_()
    assert transfer_error(expert, (x[:45], y[:45]), (x[45:], y[45:])) >= 0.5
    with pytest.raises(ValueError, match="do not occur in the training split"):
        transfer_error(expert, (x[:45], y[:45] % 2), (x[45:], y[45:]))


# ------------------------------------------------------------------------------------- Omniglot, real runs
@pytest.fixture(scope="module")
def omniglot():
    from tasklight.data.omniglot import default_omniglot_root, load_omniglot

    return load_omniglot(default_omniglot_root())


UNSEEN = ["Greek", "Korean", "Sanskrit", "Tagalog"]  # the benchmark's unseen half of the alphabets


@pytest.fixture(scope="module")
def unseen_probe(omniglot):
    """A rotation-augmented Conv4 probe trained (one epoch) on the four alphabets not in UNSEEN."""
    from tasklight.task2vec import omniglot_probe

    data = omniglot
    x_all = data.images.float().div(255).unsqueeze(1)
    seen = ~torch.isin(data.image_alphabet, torch.tensor([data.alphabets.index(a) for a in UNSEEN]))
    return omniglot_probe(x_all[seen], data.image_character[seen], hidden=32, epochs=1, seed=0)


def unseen_tasks(data, seed: int) -> tuple[dict, list[str]]:
    """Every 5-way task (all 20 drawers) of the unseen alphabets, on disjoint random characters: 23 tasks."""
    x_all = data.images.float().div(255).unsqueeze(1)
    tasks, alphabet_of = {}, []
    gen = torch.Generator().manual_seed(seed)
    for a in UNSEEN:
        chars = (data.character_alphabet == data.alphabets.index(a)).nonzero().flatten()
        chars = chars[torch.randperm(len(chars), generator=gen)]
        for k in range(len(chars) // 5):
            m = torch.isin(data.image_character, chars[5 * k: 5 * (k + 1)])
            tasks[f"{a}/{k}"] = (x_all[m], data.image_character[m])
            alphabet_of.append(a)
    return tasks, alphabet_of


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_same_alphabet_tasks_are_closer_on_a_probe_trained_on_other_alphabets(omniglot, unseen_probe, seed):
    """Achille et al. (2019), Fig. 2: distances follow the taxonomy. The Spearman correlation between
    d_sym and "different alphabet" over the 253 pairs of 23 tasks is positive, with the whole 95 %
    bootstrap interval (over tasks) above zero, for two random cuts of the alphabets into tasks.
    The exact Fisher (expectation over the labels) leaves out the Monte-Carlo noise (measured on
    this probe: 0.41 [0.22, 0.58] exact, 0.27-0.29 [0.01-0.04, 0.49-0.51] with two sampled labels)."""
    from tasklight.task2vec import taxonomy_correlation

    tasks, alphabet_of = unseen_tasks(omniglot, seed)
    assert len(tasks) == 23
    d = distance_matrix(Task2Vec(unseen_probe, exact=True).embed_tasks(tasks))
    rho, low, high = taxonomy_correlation(d, alphabet_of, reps=500, seed=seed)
    assert low > 0.05 and rho > 0.25, (rho, low, high)
    # the same statistic on a shuffled taxonomy is not positive: the test can fail
    shuffled = [alphabet_of[i] for i in torch.randperm(len(alphabet_of), generator=torch.Generator().manual_seed(5))]
    assert taxonomy_correlation(d, shuffled, reps=100)[1] < 0.0


def test_rank_statistics_over_task_pairs():
    from scipy import stats

    from tasklight.task2vec import pair_spearman, spearman, taxonomy_correlation

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).double()  # ties
    b = a + torch.randn(40, generator=g)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, rel=1e-9)
    assert spearman(a, torch.ones(40)) == 0.0  # a constant: no correlation, not nan
    d = torch.rand(6, 6, generator=g)
    d = d + d.T
    groups = [0, 0, 1, 1, 2, 2]
    diff = torch.tensor([[float(x != y) for y in groups] for x in groups])
    iu = torch.triu_indices(6, 6, 1)
    want = stats.spearmanr(d[iu[0], iu[1]].numpy(), diff[iu[0], iu[1]].numpy()).statistic
    assert pair_spearman(d, diff) == pytest.approx(want, rel=1e-9)
    rho, low, high = taxonomy_correlation(d, groups, reps=200)
    assert rho == pytest.approx(want, rel=1e-9) and low <= high
    # a distance that separates the groups perfectly (0.69 is the most a 0/1 taxonomy with ties allows here)
    rho, low, high = taxonomy_correlation(diff + 0.01 * d, groups, reps=200)
    assert rho > 0.65 and low <= rho <= high
    with pytest.raises(ValueError, match="one group per task"):
        taxonomy_correlation(d, groups[:5])


@pytest.mark.slow
def test_callback_in_a_meta_learning_run_logs_heatmap_and_table_to_wandb(tmp_path, monkeypatch):
    from tasklight.callbacks.task2vec import Task2VecCallback
    from tasklight.cli import run_cli

    monkeypatch.chdir(tmp_path)  # the CLI's run folder (runs/) goes here, not into the repository

    cli = run_cli([
        "fit", "--seed_everything", "0", "--test_after_fit", "false",
        "--model", "tasklight.meta.maml.MAMLModule",
        "--model.net", "tasklight.nn.nets.Conv4",
        "--model.net.init_args.out_features", "5", "--model.net.init_args.hidden", "8",
        "--model.loss", "cross_entropy", "--model.inner_steps", "1", "--model.inner_lr", "0.4",
        "--model.extra_eval_steps", "[]",
        "--data", "tasklight.data.omniglot.OmniglotDataModule",
        "--data.n_way", "5", "--data.k_shot", "1", "--data.q_queries", "3", "--data.meta_batch_size", "2",
        "--data.batches_per_epoch", "2", "--data.val_episodes", "2", "--data.test_episodes", "2",
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.offline", "true",
        "--trainer.logger.init_args.project", "tasklight-test",
        "--trainer.callbacks+", "tasklight.callbacks.task2vec.Task2VecCallback",
        "--trainer.callbacks.epochs", "[0, 1]", "--trainer.callbacks.max_tasks", "3",
        "--trainer.callbacks.save_dir", str(tmp_path / "t2v"),
    ])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, Task2VecCallback))
    assert [epoch for epoch, _, _ in cb.history] == [0, 1]
    for _, embeddings, matrix in cb.history:
        assert [e.name for e in embeddings] == ["episode0", "episode1", "episode2"]
        assert matrix.shape == (3, 3) and torch.equal(matrix, matrix.T) and (matrix.diagonal() == 0).all()
        assert embeddings[0].vector.shape == (32,)  # 4 conv layers x 8 filters of the MAML net
    # the embeddings follow training: the probe changed between the epochs
    assert not torch.equal(cb.history[0][1][0].vector, cb.history[1][1][0].vector)
    saved = load_embeddings(tmp_path / "t2v" / "task2vec_epoch1.pt")
    torch.testing.assert_close(saved[2].vector, cb.history[1][1][2].vector)
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    media = run_dirs[0] / "files" / "media"
    assert list(media.glob("images/task2vec/distance_heatmap_*.png"))
    tables = list(media.glob("table/task2vec/distances_*.table.json"))
    assert len(tables) == 2
    import json

    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["epoch", "task_a", "task_b", "d_sym"] and len(table["data"]) == 9


@pytest.mark.slow
def test_embed_tasks_script_writes_descriptors_a_multitask_datamodule_accepts(tmp_path):
    import importlib.util
    from pathlib import Path

    from tasklight.data.multitask import OmniglotAlphabetsDataModule

    path = Path(__file__).resolve().parents[2] / "scripts" / "embed_tasks.py"
    spec = importlib.util.spec_from_file_location("embed_tasks", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    alphabets = ["Greek", "Latin", "Tagalog"]
    result = script.main([
        "--data", "tasklight.data.multitask.OmniglotAlphabetsDataModule",
        "--data.alphabets", str(alphabets), "--split", "train",
        "--probe", "tasklight.nn.nets.Conv4", "--probe.init_args.hidden", "8",
        "--task2vec.max_examples", "60", "--output_dir", str(tmp_path),
    ])
    assert result["names"] == alphabets and result["embeddings"].shape == (3, 32)
    descriptors = torch.load(tmp_path / "descriptors.pt", weights_only=True)
    assert descriptors.shape == (3, 32) and (tmp_path / "distances.csv").read_text().startswith("task,Greek")
    dm = OmniglotAlphabetsDataModule(alphabets=alphabets, task_descriptors=str(tmp_path / "descriptors.pt"))
    torch.testing.assert_close(dm.task_descriptors, descriptors)
    # the descriptors are the transformed embeddings, task i in row i
    torch.testing.assert_close(descriptors, task_descriptors(load_embeddings(tmp_path / "task2vec.pt")))


def test_multitask_module_probe_uses_its_trunk():
    from tasklight.data.multitask import TaskSpec
    from tasklight.multitask import HardSharing, MultiTaskModule

    torch.manual_seed(0)
    trunk = Conv4(out_features=0, hidden=4, image_size=16)
    module = MultiTaskModule(trunk, architecture=HardSharing(), tasks=[TaskSpec("a", 3), TaskSpec("b", 5)])
    t2v = Task2Vec(module, exact=True)
    assert t2v.adapter.network is module.trunk and t2v.adapter.head_path is None
    assert t2v.layers == ["features.0.0", "features.1.0", "features.2.0", "features.3.0"]
    x, y = torch.rand(12, 1, 16, 16), torch.arange(12) % 3
    # the same as embedding with the bare trunk as probe
    torch.testing.assert_close(t2v.embed((x, y)).vector, Task2Vec(trunk, head=None, exact=True).embed((x, y)).vector)


def test_evaluate_expert_selection_scores_task2vec_oracle_random_and_generic(tmp_path):
    from tasklight.task2vec import evaluate_expert_selection, load_expert

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])

    def blobs(n, seed):
        y = torch.arange(n) % 3
        return centers[y] + 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)), y

    def expert(scale):
        net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 3))
        with torch.no_grad():
            net[0].weight.copy_(scale * (torch.eye(2) + 0.1 * torch.randn(2, 2, generator=g)))
            net[0].bias.zero_()
        return net

    experts = {"sharp": expert(1.0), "blurred": expert(0.05), "dead": expert(0.0)}
    torch.save(experts["blurred"], tmp_path / "blurred.pt")  # an expert given as a file
    given = dict(experts, blurred=str(tmp_path / "blurred.pt"))
    expert_tasks = {n: blobs(60, i) for i, n in enumerate(experts)}
    train, test = blobs(30, 10), blobs(60, 11)
    embedder = Task2Vec(experts["sharp"], exact=True)
    with pytest.raises(ValueError, match="allow_pickle=True"):  # a pickled module is read only when allowed
        evaluate_expert_selection(embedder, given, expert_tasks, train, test, name="new")
    given["blurred"] = load_expert(given["blurred"], allow_pickle=True)
    sel = evaluate_expert_selection(embedder, given, expert_tasks, train, test, name="new",
                                    generic=experts["sharp"])
    want = {n: transfer_error(load_expert(m), train, test) for n, m in given.items()}
    assert sel.errors == want and sel.oracle == min(want, key=want.get)
    assert sel.random_error == pytest.approx(sum(want.values()) / 3)
    assert sel.generic_error == want["sharp"] and sel.task2vec_error == want[sel.ranking.chosen]
    assert sel.oracle_error <= sel.task2vec_error and sel.errors["dead"] > 0.5
    ranking = rank_experts(embedder.embed(train), {n: embedder.embed(t) for n, t in expert_tasks.items()})
    assert sel.ranking.experts == ranking.experts
    assert sel.ranking.distances == pytest.approx(ranking.distances)
    with pytest.raises(ValueError, match="no training task"):
        evaluate_expert_selection(embedder, given, {"sharp": expert_tasks["sharp"]}, train, test)
