"""The probe network: any classifier (ours, a LightningModule, a torchvision or timm model) seen as
``feature extractor + linear head``; its head is replaced by one refitted on each task."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasklight.nn.nets import make_vmap_safe
from tasklight.task2vec.data import _batches, task_tensors

_FILTER_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = nn.modules.batchnorm._BatchNorm


def _resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [n for n, m in root.named_modules() if n and isinstance(m, nn.Module)]
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise ValueError(f"the probe has no {what} {path!r}; its submodules are: {shown}") from None


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class _ProbeWithHead(nn.Module):
    """``head(flatten(body(x)))``: the probe's feature extractor and a task's linear head."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


class ProbeAdapter:
    """Turns any probe network into ``feature extractor + new linear head`` for one task at a time.

    Args:
        probe: an ``nn.Module`` or ``LightningModule``; it is never modified (a copy is used).
        network: dotted path of the submodule mapping inputs to outputs (or features). Default:
            the probe itself, except for a ``LightningModule`` with a ``net`` attribute (the
            meta-learners), whose ``net`` is used, or with a ``trunk`` (``MultiTaskModule`` with
            hard sharing), whose trunk is used as feature extractor (``head="auto"`` then means
            no head to replace).
        head: dotted path (inside ``network``) of the classifier layer to replace, ``"auto"`` (the
            last ``nn.Linear``, if the network ends with one) or ``None`` (the network's output,
            flattened, is the feature: a head is appended).
    """

    def __init__(self, probe: nn.Module, network: Optional[str] = None, head: Optional[str] = "auto") -> None:
        if not isinstance(probe, nn.Module):
            raise TypeError(f"the probe must be an nn.Module or LightningModule, got {type(probe).__name__}")
        if network is None and _is_lightning(probe):
            if isinstance(getattr(probe, "net", None), nn.Module):
                network = "net"  # the meta-learners' network
            elif isinstance(getattr(probe, "trunk", None), nn.Module):
                network = "trunk"  # a multi-task module's shared trunk: its output is the feature
                head = None if head == "auto" else head
        self.network_path = network or ""
        self.network = _resolve(probe, network, "network submodule") if network else probe
        if head == "auto":
            linears = [n for n, m in self.network.named_modules() if isinstance(m, nn.Linear)]
            head = linears[-1] if linears else None
            self._head_is_guess = True
        else:
            self._head_is_guess = False
        if head is not None:
            module = _resolve(self.network, head, "head layer")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"the head {head!r} is a {type(module).__name__}, not an nn.Linear; name the final "
                                 f"linear layer, or pass head=None to append a head to the network's output")
        self.head_path: Optional[str] = head

    def layer_names(self) -> list[str]:
        """Conv and linear layers of the feature extractor, in module order (the default layers)."""
        skip = self.head_path or "\0"
        return [n for n, m in self.network.named_modules()
                if isinstance(m, _FILTER_LAYERS) and n != skip and not n.startswith(skip + ".")]

    def parameter_names(self, layers: Optional[Sequence[str]]) -> list[tuple[str, str]]:
        """``(layer as given, parameter name inside the body)`` for each chosen layer's filter weights."""
        if layers is None:
            layers = self.layer_names()
            if not layers:
                raise ValueError("the probe has no conv or linear layers outside its head; pass `layers` naming the "
                                 "modules (or parameters) whose Fisher to use")
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("`layers` is empty: name at least one module of the probe (or leave it unset for all "
                             "conv/linear layers outside the head)")
        params = dict(self.network.named_parameters())
        out = []
        for name in layers:
            if name in params:
                pname = name
            else:
                module = _resolve(self.network, name, "layer")
                w = getattr(module, "weight", None)
                if not isinstance(w, nn.Parameter):
                    raise ValueError(f"the probe's layer {name!r} ({type(module).__name__}) has no weight parameter; "
                                     f"choose conv/linear/norm layers, e.g. {self.layer_names()[:6]}")
                pname = f"{name}.weight" if name else "weight"
            if self.head_path is not None and (pname == self.head_path or pname.startswith(self.head_path + ".")):
                raise ValueError(f"layer {name!r} is the classifier head, which Task2Vec replaces per task; choose "
                                 f"layers of the feature extractor")
            out.append((name, pname))
        return out

    def body(self, example: Tensor) -> nn.Module:
        """A fresh copy of the feature extractor (head replaced by identity), in eval mode.

        ``example`` (a few inputs) checks that the replaced head is the network's last operation.
        """
        net = copy.deepcopy(self.network)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        make_vmap_safe(net)
        with torch.no_grad():
            try:
                reference = net(example)
            except Exception as err:  # noqa: BLE001 - say which network failed on which input
                raise ValueError(f"the probe network{f' {self.network_path!r}' if self.network_path else ''} failed "
                                 f"on the task's inputs of shape {tuple(example.shape)}: {err}. Pass `network` "
                                 f"naming a submodule that maps x alone to outputs or features.") from err
        if self.head_path is None:
            return net
        old_head = net.get_submodule(self.head_path)
        with torch.no_grad():
            _set_submodule(net, self.head_path, nn.Identity())
            feats = net(example)
            same = (feats.dim() >= 2 and feats[0].numel() == old_head.in_features
                    and torch.allclose(old_head(feats.flatten(1)), reference, atol=1e-5, rtol=1e-4))
        if not same:
            how = "the last nn.Linear found" if self._head_is_guess else f"head {self.head_path!r}"
            raise ValueError(f"{how} ({self.head_path!r}) is not the network's final operation, so replacing it does "
                             f"not give a classifier; pass `head` naming the final linear layer, or `head: null` with "
                             f"`network` naming a feature extractor")
        return net

    def features(self, body: nn.Module, x: Tensor, batch_size: int) -> Tensor:
        with torch.no_grad():
            return torch.cat([body(x[s]).flatten(1) for s in _batches(len(x), batch_size)])


def _is_lightning(module: nn.Module) -> bool:
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, LightningModule)


def set_batchnorm_stats(net: nn.Module, x: Tensor, batch_size: int) -> int:
    """Give every BatchNorm layer of ``net`` fixed statistics: the average over ``x`` (in batches).

    Layers built without running statistics (``track_running_stats=False``, as in MAML's Conv4)
    get them; existing ones are reset. Afterwards ``net`` is in eval mode, so every example is
    processed independently and per-example gradients are well defined. Returns the layer count.
    """
    bns = [m for m in net.modules() if isinstance(m, _BATCH_NORMS)]
    for m in bns:
        dev = next((t.device for t in m.parameters()), x.device)
        m.track_running_stats = True
        m.momentum = None  # cumulative average over the batches
        m.register_buffer("running_mean", torch.zeros(m.num_features, device=dev))
        m.register_buffer("running_var", torch.ones(m.num_features, device=dev))
        m.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=dev))
    if bns:
        net.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            for s in _batches(len(x), batch_size):
                net(x[s])
    net.eval()
    return len(bns)


def _check_probe_bn_stats(net: nn.Module) -> None:
    for name, m in net.named_modules():
        if isinstance(m, _BATCH_NORMS) and m.running_mean is None:
            raise ValueError(f"bn_stats='probe' but the probe's BatchNorm {name!r} keeps no running statistics "
                             f"(track_running_stats=False); use bn_stats='task' to compute them on the task's data")


def train_classifier(net: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 3e-3, batch_size: int = 64,
                     seed: int = 0) -> nn.Module:
    """Train ``net`` (logits over the classes of ``y``, remapped to ``0..C-1``) with Adam and
    cross-entropy for ``epochs`` passes in seeded random order: a quick way to make a probe or an
    expert from a labelled data set. Returns ``net`` in eval mode."""
    x, y = task_tensors((x, y))
    _, y = torch.unique(y, return_inverse=True)
    opt = torch.optim.Adam(net.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in _batches(len(x), batch_size):
                idx = perm[s]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def omniglot_probe(images: Tensor, characters: Tensor, hidden: int = 32, epochs: int = 3, rotations: int = 4,
                   lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """A Conv4 probe trained to classify Omniglot characters, each of ``rotations`` rotations by
    90 degrees counted as a class of its own (the standard augmentation of the few-shot
    literature): ``rotations`` times the classes and examples of the plain character task, so its
    filters see strokes in every orientation.

    ``images`` are ``[N, 1, H, W]`` floats, ``characters`` their ``[N]`` character ids. Returns the
    network in eval mode; its head (``head``) is replaced per task by :class:`Task2Vec`.
    """
    from tasklight.nn.nets import Conv4

    if rotations < 1 or rotations > 4:
        raise ValueError(f"rotations must be 1..4 (multiples of 90 degrees), got {rotations}")
    images, characters = task_tensors((images, characters), "probe training set")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    _, ids = torch.unique(characters, return_inverse=True)
    n_chars = int(ids.max()) + 1
    xs = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(rotations)])
    ys = torch.cat([ids + k * n_chars for k in range(rotations)])
    torch.manual_seed(seed)
    net = Conv4(out_features=n_chars * rotations, hidden=hidden, image_size=images.shape[-1],
                in_channels=images.shape[1])
    return train_classifier(net, xs, ys, epochs, lr=lr, batch_size=batch_size, seed=seed)


class ImageTransform:
    """Maps a task's images to what a pretrained image model expects: ``channels`` channels
    (single-channel images are repeated), at least ``size`` pixels on the short side (bilinear
    resize), normalised with ``mean``/``std`` per channel. Picklable; applied in batches."""

    def __init__(self, channels: int = 3, size: Optional[int] = 64,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need one entry per channel ({channels}), got {len(mean)} and {len(std)}")
        self.channels, self.size = channels, size
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise ValueError(f"ImageTransform expects images [N, C, H, W] (or [N, H, W]), got {tuple(x.shape)}")
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        if x.shape[1] != self.channels:
            raise ValueError(f"images have {x.shape[1]} channels but the probe expects {self.channels}")
        if self.size is not None and min(x.shape[-2:]) < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean.to(x)) / self.std.to(x)


def pretrained_probe(name: str, weights: Optional[str] = "DEFAULT", size: Optional[int] = 64
                     ) -> tuple[nn.Module, ImageTransform]:
    """A pretrained image classifier as a Task2Vec probe, and the input transform it needs.

    ``name`` is ``"torchvision:<model>"`` (``torchvision.models.get_model(model, weights=weights)``;
    ``weights=None`` builds it untrained) or ``"timm:<model>"`` (``timm.create_model(model,
    pretrained=weights is not None)``). The weights download on first use (the library's own
    cache). Pass both to :class:`Task2Vec` (``Task2Vec(probe, input_transform=transform,
    bn_stats="probe", method="variational")``: a pretrained network's BatchNorm statistics are
    part of it, and the variational estimate needs no per-example gradients, which large probes
    make expensive).
    """
    kind, _, model = name.partition(":")
    if not model or kind not in ("torchvision", "timm"):
        raise ValueError(f"probe name must be 'torchvision:<model>' or 'timm:<model>', got {name!r}")
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise ImportError("pretrained_probe('torchvision:...') needs torchvision: pip install torchvision "
                              "(the build matching your torch)") from None
        net = torchvision.models.get_model(model, weights=weights)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    else:
        try:
            import timm
        except ImportError:
            raise ImportError("pretrained_probe('timm:...') needs timm: pip install timm") from None
        net = timm.create_model(model, pretrained=weights is not None)
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return net.eval(), ImageTransform(len(mean), size, mean, std)
