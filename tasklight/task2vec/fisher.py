"""The diagonal Fisher information of a probe with a task's head: the Monte-Carlo (or exact)
estimate from per-example gradients, and the variational estimate of Achille et al. (2019), a learned
per-filter posterior variance; and the per-filter averaging that makes the embedding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tasklight.task2vec.data import _batches


@dataclass
class HeadFit:
    head: nn.Linear
    loss: float  # final regularised training loss
    error: float  # training error of the fitted head


def fit_linear_head(features: Tensor, labels: Tensor, num_classes: int, steps: int = 100,
                    weight_decay: float = 1e-2) -> HeadFit:
    """Multinomial logistic regression on fixed features (full-batch L-BFGS, zero init, L2 penalty).

    ``weight_decay`` multiplies ``0.5 * ||W||^2`` and keeps the fitted head from becoming
    arbitrarily confident on separable data (which would drive the Fisher to zero).
    """
    head = nn.Linear(features.shape[1], num_classes).to(features.device, features.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max(1, steps), history_size=20,
                            line_search_fn="strong_wolfe")
    feats, labels = features.detach(), labels.to(features.device)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        if steps > 0:
            opt.step(closure)
        with torch.no_grad():
            logits = head(feats)
            loss = F.cross_entropy(logits, labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
            error = (logits.argmax(-1) != labels).float().mean()
    for p in head.parameters():
        p.requires_grad_(False)
    return HeadFit(head, float(loss), float(error))


def fisher_diagonal(model: nn.Module, x: Tensor, param_names: Sequence[str], *, mc_samples: int = 1,
                    exact: bool = False, batch_size: int = 64,
                    generator: Optional[torch.Generator] = None,
                    labels: Optional[Tensor] = None, engine: str = "auto") -> dict[str, Tensor]:
    """Diagonal Fisher information of ``log p(y|x)`` (softmax of ``model(x)``) w.r.t. the named parameters.

    ``F = mean_i E_{y ~ p(.|x_i)} [g_i(y)^2]`` with ``g_i(y) = d/dw log p(y|x_i)`` the gradient of ONE
    example (``torch.func.grad`` vmapped over examples). Labels are sampled from the model
    (``mc_samples`` per example; sampling uses ``generator``), or, with ``exact=True``, the
    expectation over all classes is computed exactly. ``model`` must treat examples independently
    (eval mode; see :func:`set_batchnorm_stats`). ``labels`` (``[N]`` or ``[N, mc_samples]``) gives
    the sampled labels instead of drawing them (to repeat another implementation's draws exactly).

    ``engine``: ``"layers"`` gets the squared per-example gradients of ``nn.Linear`` and ``nn.Conv2d``
    weights and biases from ONE forward and backward pass of a batch (each layer's input and output
    gradient per example, the conv weight's per-example gradients by one grouped convolution with the
    batch folded into the channels, a linear weight's squared gradients by one matrix product);
    ``"vmap"`` runs ``torch.func.grad`` of one example vmapped over the batch (any parameter);
    ``"auto"`` uses ``layers`` where it applies and ``vmap`` for the other parameters.
    Both give the same Fisher up to float rounding.
    """
    if engine not in ("auto", "layers", "vmap"):
        raise ValueError(f"engine must be 'auto', 'layers' or 'vmap', got {engine!r}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    all_params = dict(model.named_parameters())
    missing = [n for n in param_names if n not in all_params]
    if missing:
        raise ValueError(f"the model has no parameters {missing}; it has {list(all_params)}")
    params = {n: all_params[n].detach() for n in param_names}
    if labels is not None:
        if exact:
            raise ValueError("labels are the Monte-Carlo draws; exact=True sums over every class instead: give one")
        labels = labels.reshape(len(labels), -1) if labels.dim() == 1 else labels
        if labels.dim() != 2 or labels.shape[0] != len(x) or labels.shape[1] != mc_samples:
            raise ValueError(f"labels must have shape [N={len(x)}] or [N, mc_samples={mc_samples}], got "
                             f"{tuple(labels.shape)}")

    def log_prob(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return -F.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    layers = _layer_params(model, param_names) if engine in ("auto", "layers") else {}
    if engine == "layers" and len(layers) < len(param_names):
        raise ValueError(f"engine='layers' handles the weights and biases of nn.Linear and (ungrouped, zero-padded) "
                         f"nn.Conv2d layers only; {sorted(set(param_names) - set(layers))} are not: use "
                         f"engine='vmap' or 'auto'")
    rest = {n: p for n, p in params.items() if n not in layers}

    def add(xb: Tensor, yb: Tensor, weight: Optional[Tensor] = None) -> None:
        for s in _batches(len(xb), batch_size):
            if layers:
                for n, sq in _layer_sq_grads(model, layers, xb[s], yb[s], None if weight is None else weight[s]).items():
                    acc[n] += sq
            if not rest:
                continue
            grads = per_example(rest, xb[s], yb[s])
            for n, g in grads.items():
                sq = g.pow(2)
                if weight is not None:
                    sq = sq * weight[s].view(-1, *([1] * (sq.dim() - 1)))
                acc[n] += sq.sum(0)

    with torch.enable_grad():
        for s in _batches(len(x), batch_size):
            xb = x[s]
            if labels is not None:
                add(xb.repeat_interleave(mc_samples, 0), labels[s].reshape(-1).to(xb.device))
                continue
            with torch.no_grad():
                probs = F.softmax(model(xb).float(), dim=-1)
            if exact:
                for c in range(probs.shape[1]):
                    add(xb, torch.full((len(xb),), c, dtype=torch.long, device=xb.device), probs[:, c].to(xb.dtype))
            else:
                ys = torch.multinomial(probs.cpu(), mc_samples, replacement=True, generator=generator).to(xb.device)
                add(xb.repeat_interleave(mc_samples, 0), ys.reshape(-1))
    count = len(x) * (1 if exact else mc_samples)
    return {n: a / count for n, a in acc.items()}


def _layer_params(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Module, str]]:
    """The named parameters that are the weight or bias of a layer ``_layer_sq_grads`` handles."""
    out = {}
    for name in names:
        path, _, kind = name.rpartition(".")
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        conv_ok = (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                   and not isinstance(m.padding, str))
        if kind in ("weight", "bias") and (isinstance(m, nn.Linear) or conv_ok) and getattr(m, kind) is not None:
            out[name] = (m, kind)
    return out


def _layer_sq_grads(model: nn.Module, layers: dict[str, tuple[nn.Module, str]], x: Tensor, y: Tensor,
                    weight: Optional[Tensor]) -> dict[str, Tensor]:
    """``sum_i w_i g_i^2`` of each parameter in ``layers``, ``g_i`` the gradient of ``log p(y_i|x_i)``, from
    one forward and one backward pass: a layer's per-example gradient is its output gradient times its
    input (for a convolution, its input patches), examples being independent."""
    modules = {id(m): m for m, _ in layers.values()}
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(module, inputs, output):
        seen[id(module)] = (inputs[0].detach(), output)

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        x = x.detach().requires_grad_(True)  # a graph through every layer, also for frozen parameters
        logp = -F.cross_entropy(model(x), y, reduction="sum")
    finally:
        for h in handles:
            h.remove()
    keys = list(seen)
    deltas = dict(zip(keys, torch.autograd.grad(logp, [seen[k][1] for k in keys])))
    w = None if weight is None else weight.to(x.dtype)
    out = {}
    for name, (m, kind) in layers.items():
        a, d = seen[id(m)][0], deltas[id(m)]
        if isinstance(m, nn.Linear) and a.dim() == 2 and kind == "weight":
            # g_i = d_i a_i^T, so sum_i w_i g_i^2 = (w * d^2)^T a^2: one matrix product, no per-example tensor
            d2 = d.pow(2) if w is None else d.pow(2) * w[:, None]
            out[name] = d2.t() @ a.pow(2)
            continue
        if kind == "bias":
            g = d.reshape(len(x), -1, d.shape[-1]).sum(1) if isinstance(m, nn.Linear) else d.flatten(2).sum(2)
        elif isinstance(m, nn.Linear):
            g = torch.bmm(d.reshape(len(x), -1, d.shape[-1]).transpose(1, 2), a.reshape(len(x), -1, a.shape[-1]))
        else:
            g = _conv_per_example_weight_grads(m, a, d)
        sq = g.pow(2)
        if w is not None:
            sq = sq * w.view(-1, *([1] * (sq.dim() - 1)))
        out[name] = sq.sum(0).reshape(getattr(m, kind).shape)
    return out


def _conv_per_example_weight_grads(m: nn.Conv2d, a: Tensor, d: Tensor) -> Tensor:
    """``[B, out, in, kh, kw]``: each example's weight gradient of conv ``m`` (input ``a``, output gradient ``d``),
    by ONE grouped convolution's weight gradient with the batch folded into the channels (``groups = B``; the
    per-example trick of Rochette et al. 2019), about 3x faster on the CPU than unfolded patches and a batched
    matrix product on the Conv4 probe's shapes."""
    n = a.shape[0]
    weight = a.new_empty(n * m.out_channels, m.in_channels, *m.kernel_size)  # only its shape is read
    g = torch.ops.aten.convolution_backward(
        d.reshape(1, n * m.out_channels, *d.shape[2:]), a.reshape(1, n * m.in_channels, *a.shape[2:]), weight,
        None, list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], n, [False, True, False])[1]
    return g.reshape(n, m.out_channels, m.in_channels, *m.kernel_size)


def per_filter(fisher: Tensor) -> Tensor:
    """Average a weight's Fisher over each filter / unit (all dims but the first)."""
    return fisher.reshape(fisher.shape[0], -1).mean(1) if fisher.dim() > 1 else fisher


@dataclass
class VariationalFisher:
    """The result of :func:`variational_fisher` for each named weight.

    ``precision[name]``: one entry per filter (conv) or unit (linear), ``1 / sigma_f^2`` with
    ``sigma_f^2`` the learned posterior variance shared by the weights of filter ``f``;
    ``prior_precision[name]``: ``1 / lambda^2``, the learned prior precision of the layer (a scalar);
    ``losses``: the objective at each step (cross-entropy under weight noise + beta x KL);
    ``drift``: mean absolute change of ``log sigma_f^2`` between the two halves of the averaging
    window (near 0 once converged; large when the variances were still moving).
    """

    precision: dict[str, Tensor]
    prior_precision: dict[str, Tensor]
    losses: list[float]
    drift: float = 0.0


def _noise_hook(logvar: Tensor, gen: Optional[torch.Generator], eps: float):
    """Forward hook of a conv/linear layer: local reparametrisation (Kingma et al. 2015) of the
    weight noise ``w + sigma_f * n`` with ``n ~ N(0, I)``, a variance ``sigma_f^2 = exp(logvar[f])``
    per output filter: the output gains Gaussian noise of variance ``layer(input^2, sigma^2)``."""

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        x = inputs[0]
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        var_w = logvar.exp().view(shape).expand_as(module.weight)
        if isinstance(module, nn.Linear):
            var_out = F.linear(x.pow(2), var_w)
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[module.weight.dim() - 2]
            var_out = conv(x.pow(2), var_w, None, module.stride, module.padding, module.dilation, module.groups)
        noise = torch.randn(output.shape, generator=gen, device="cpu").to(output)
        return output + (var_out + eps).sqrt() * noise

    return hook


def variational_fisher(model: nn.Module, x: Tensor, y: Tensor, layer_names: Sequence[str], *, beta: float = 1e-7,
                       steps: int = 200, lr: float = 1e-2, batch_size: int = 100, average_last: float = 0.5,
                       noise_eps: float = 1e-8, generator: Optional[torch.Generator] = None) -> VariationalFisher:
    """The variational Fisher of Achille et al. (2019, Sect. 2), as in the authors' public code.

    Each chosen conv/linear layer's weights get a Gaussian posterior ``N(w, diag(sigma^2))`` with
    one variance per filter and a prior ``N(0, lambda^2 I)`` with one variance per layer; the
    variances (``log sigma_f^2`` and ``log lambda^2``, the only trained quantities: the probe and
    the task's head stay fixed) minimise, by Adam on minibatches of the task's data with its true
    labels,

        ``E_{w ~ N(w, sigma^2)} [cross-entropy] + beta * sum_i (w_i^2 / lambda^2 + sigma_i^2 / lambda^2
        + log lambda^2 - log sigma_i^2 - 1)``

    (``beta`` times twice the KL divergence, the normalisation of the authors' code, whose default
    is ``beta = 1e-7``). Near the optimum the expected loss grows by ``0.5 sum_i H_ii sigma_i^2``,
    so the stationary point is ``1 / sigma_f^2 = mean_{i in f} H_ii / (2 beta) + 1 / lambda^2``:
    the per-filter mean of the loss curvature (the Fisher, for a well-fitted head), plus the prior
    precision. Initialisation as the authors': ``sigma_f^2 = 0.05 x`` the variance of filter ``f``'s
    weights, ``lambda^2`` = the mean squared weight of the layer.

    ``model`` maps inputs to logits and must treat examples independently (eval mode, fixed
    BatchNorm statistics). ``layer_names`` name ``nn.Conv*d``/``nn.Linear`` submodules.

    The objective's gradient is noisy (one weight-noise draw per example and step), so the returned
    log-variances are averaged over the last ``average_last`` fraction of the steps (iterate
    averaging; 0 takes the last iterate, as the authors' code does).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the paper's code uses 1e-7), got {beta}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    if not 0.0 <= average_last < 1.0:
        raise ValueError(f"average_last must be in [0, 1), got {average_last}")
    modules = {}
    for name in layer_names:
        m = model.get_submodule(name)
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            raise ValueError(f"variational Fisher: layer {name!r} is a {type(m).__name__}; it needs nn.Conv1d/2d/3d "
                             f"or nn.Linear layers (choose them with `layers`)")
        modules[name] = m
    device = next(iter(modules.values())).weight.device
    logvar, loglambda2 = {}, {}
    for name, m in modules.items():
        w = m.weight.detach()
        filt_var = w.reshape(w.shape[0], -1).var(1, unbiased=True) if w[0].numel() > 1 else w.pow(2).reshape(-1)
        logvar[name] = (filt_var * 0.05 + 1e-8).log().clone().requires_grad_(True)
        loglambda2[name] = (w.pow(2).mean() + 1e-8).log().clone().requires_grad_(True)
    opt = torch.optim.Adam(list(logvar.values()) + list(loglambda2.values()), lr=lr, betas=(0.9, 0.999))
    hooks = [m.register_forward_hook(_noise_hook(logvar[n], generator, noise_eps)) for n, m in modules.items()]
    labels = y.to(x.device)
    losses = []
    first_avg = steps - max(1, int(round(average_last * steps)))
    sums = {n: torch.zeros_like(v) for n, v in logvar.items()}
    mid = {n: torch.zeros_like(v) for n, v in logvar.items()}
    half = first_avg + (steps - first_avg) // 2
    sums_lam = {n: torch.zeros_like(v) for n, v in loglambda2.items()}
    try:
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator).to(x.device)
                ce = F.cross_entropy(model(x[idx]), labels[idx])
                kl = torch.zeros((), device=device)
                for name, m in modules.items():
                    w2 = m.weight.detach().pow(2)
                    per_filter_n = w2[0].numel()
                    lam2 = loglambda2[name].exp()
                    kl = kl + (w2.sum() / lam2 + per_filter_n * logvar[name].exp().sum() / lam2
                               + w2.numel() * loglambda2[name] - per_filter_n * logvar[name].sum() - w2.numel())
                loss = ce + beta * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if _ == half:
                    mid = {n: v.clone() for n, v in sums.items()}
                if _ >= first_avg:
                    for n in logvar:
                        sums[n] += logvar[n].detach()
                        sums_lam[n] += loglambda2[n].detach()
    finally:
        for h in hooks:
            h.remove()
    count = steps - first_avg
    n_first, n_second = half - first_avg, steps - half
    drift = 0.0
    if n_first > 0 and n_second > 0:
        diffs = torch.cat([((sums[n] - mid[n]) / n_second - mid[n] / n_first).abs() for n in sums])
        drift = float(diffs.mean())
    return VariationalFisher({n: (-v / count).exp() for n, v in sums.items()},
                             {n: (-v / count).exp() for n, v in sums_lam.items()}, losses, drift)
