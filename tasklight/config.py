"""Objects as configs: what makes tasklight's checkpoints self-describing.

Every tasklight class built from constructor arguments (networks, losses, weightings, decision
problems, learners) records the arguments it was built with (:class:`RecordsInit`).
:func:`to_config` turns such an object into the same ``{"class_path": ..., "init_args": ...}``
mapping a LightningCLI YAML holds, and :class:`SelfDescribing` stores the learner's complete
config (its net, loss, trunk, heads, optimiser... as configs) as its hyperparameters. So
``Module.load_from_checkpoint(path)`` rebuilds the trained module from the checkpoint alone, through
Lightning's own instantiator (``lightning.pytorch.cli.instantiate_module``), whether the module was
built by the CLI or in Python; and an explicit argument that contradicts the checkpoint (another
loss, another architecture) is an error instead of a silently different model.

Objects that are not tasklight's and record nothing: ``torch.nn`` modules whose constructor
arguments are all readable as attributes (``nn.CrossEntropyLoss(label_smoothing=0.1)``,
``nn.Linear``...) are described from those; ``functools.partial`` of a class (``partial(Adam, lr=..)``)
and importable functions/classes are described by their path. Anything else (a hand-assembled
``nn.Sequential``, a lambda) cannot be: the learner still trains and checkpoints, and
``load_from_checkpoint`` then asks for that argument by name. Subclass :class:`RecordsInit` (or
build the object through the CLI) to make your own classes describable.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["RecordsInit", "SelfDescribing", "to_config", "from_config", "NotConfigurable", "class_path_of"]

_ARGS = "_tasklight_init_args"
_DEPTH = "_tasklight_init_depth"
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
#: the hyperparameter holding the names of arguments that could not be stored as config
UNDESCRIBED = "_undescribed"


class NotConfigurable(TypeError):
    """An object that cannot be written as a class path and init args."""


def class_path_of(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


#: (class name, exception) of tasklight constructors that raised, newest last: the CLI reports them
#: as one line instead of the argument parser's traceback.
constructor_errors: list[tuple[str, BaseException]] = []


def _wrap_init(init):
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        depth = self.__dict__.get(_DEPTH, 0)
        object.__setattr__(self, _DEPTH, depth + 1)
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                named[name] = value
        # a subclass passing *args/**kwargs on: the parent's constructor names them
        levels = self.__dict__.setdefault("_tasklight_init_levels", []) if depth else None
        if depth:
            levels.append(named)
        else:
            object.__setattr__(self, "_tasklight_init_levels", [])
        try:
            init(self, *args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
            if depth == 0:
                constructor_errors.append((type(self).__name__, err))
            raise
        finally:
            object.__setattr__(self, _DEPTH, depth)
        if depth == 0:  # the outermost constructor: these are the arguments the user gave
            recorded = {}
            has_var = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())
            if has_var:
                for level in reversed(self.__dict__.get("_tasklight_init_levels", [])):
                    recorded.update(level)
            recorded.update(named)
            self.__dict__.pop("_tasklight_init_levels", None)
            object.__setattr__(self, _ARGS, recorded)
            after = getattr(self, "_after_init", None)
            if after is not None:
                after()

    __init__.__signature__ = sig  # what Lightning's checkpoint loader reads (it does not unwrap)
    return __init__


class RecordsInit:
    """Mixin: instances remember the arguments of their outermost constructor (``init_args``)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _wrap_init(cls.__dict__["__init__"])

    @property
    def init_args(self) -> dict[str, Any]:
        return dict(self.__dict__.get(_ARGS, {}))


def _importable(obj: Any) -> Optional[str]:
    mod, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not name or "<" in name:
        return None
    try:
        target = importlib.import_module(mod)
        for part in name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return None
    return f"{mod}.{name}" if target is obj else None


def _from_attributes(obj: nn.Module) -> dict[str, Any]:
    """Init args of a ``torch.nn`` module read back from its attributes (all must be there)."""
    params = inspect.signature(type(obj).__init__).parameters
    if any(p.kind is p.VAR_POSITIONAL for p in params.values()) or next(obj.children(), None) is not None:
        raise NotConfigurable(f"{class_path_of(obj)} is a container: its parts are not constructor arguments")
    args = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in ("size_average", "reduce",
                                                                                       "device", "dtype"):
            continue
        if name == "bias" and isinstance(getattr(obj, "bias", None), (torch.Tensor, type(None))):
            args[name] = obj.bias is not None
            continue
        if not hasattr(obj, name):
            raise NotConfigurable(f"{class_path_of(obj)}: argument {name!r} is not readable from the module")
        value = getattr(obj, name)
        if isinstance(value, torch.Tensor):
            raise NotConfigurable(f"{class_path_of(obj)}: argument {name!r} is a tensor")
        args[name] = value
    return args


def to_config(value: Any) -> Any:
    """A YAML-able description of ``value`` (see the module docstring); raises :class:`NotConfigurable`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_config(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_config(v) for k, v in value.items()}
    if isinstance(value, RecordsInit):  # (no recorded arguments: no constructor of its own takes any)
        return {"class_path": class_path_of(value), "init_args": {k: to_config(v) for k, v in value.init_args.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class_path": class_path_of(value),
                "init_args": {f.name: to_config(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, functools.partial):
        path = _importable(value.func)
        if path is None or value.args:
            raise NotConfigurable(f"functools.partial of {value.func!r} with positional arguments")
        return {"class_path": path, "init_args": {k: to_config(v) for k, v in value.keywords.items()}}
    if isinstance(value, nn.Module) and type(value).__module__.startswith("torch.nn"):
        return {"class_path": class_path_of(value), "init_args": {k: to_config(v) for k, v in
                                                                 _from_attributes(value).items()}}
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        path = _importable(value)
        if path is not None:
            return path
    raise NotConfigurable(f"a {class_path_of(value)} object: give it by class path (CLI) or make its class "
                          f"a tasklight.config.RecordsInit subclass")


def from_config(cfg: Any) -> Any:
    """Build the object a :func:`to_config` description (or a CLI ``class_path`` mapping) names."""
    if isinstance(cfg, list):
        return [from_config(v) for v in cfg]
    if isinstance(cfg, dict) and "class_path" in cfg:
        mod, _, name = cfg["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(mod), name)
        args = {k: from_config(v) for k, v in {**cfg.get("init_args", {}), **cfg.get("dict_kwargs", {})}.items()}
        return cls(**args)
    if isinstance(cfg, dict):
        return {k: from_config(v) for k, v in cfg.items()}
    return cfg


def _build(value: Any) -> Any:
    """A stored hyperparameter back as an object: configs built, dotted paths of callables imported."""
    if isinstance(value, (dict, list)):
        return from_config(value)
    if isinstance(value, str) and "." in value and " " not in value:
        mod, _, name = value.rpartition(".")
        try:
            obj = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError, ValueError):
            return value
        return obj if callable(obj) else value
    return value


def _given_cli_hparams() -> Optional[dict]:
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get()


class SelfDescribing(RecordsInit):
    """Mixin for LightningModules: the complete constructor config becomes the hyperparameters.

    The CLI's config (every class path and init arg) is kept as given; a module built in Python
    is described by :func:`to_config`. ``load_from_checkpoint(path)`` then needs nothing else, and
    an explicit argument that contradicts the checkpoint's network, loss or other object raises.
    """

    def _after_init(self) -> None:
        from lightning.pytorch.utilities.parsing import save_hyperparameters

        given = _given_cli_hparams()
        if given is not None and _canonical(str(given.get("_class_path", class_path_of(self)))) == class_path_of(self):
            hp = dict(given)
            hp.setdefault("_class_path", class_path_of(self))
        else:
            hp = {"_class_path": class_path_of(self), "_instantiator": INSTANTIATOR}
            undescribed = []
            for k, v in self.init_args.items():
                try:
                    hp[k] = to_config(v)
                except NotConfigurable:
                    hp[k] = None
                    undescribed.append(k)
            if undescribed:
                hp[UNDESCRIBED] = undescribed
        frame = inspect.currentframe()
        save_hyperparameters(self, ignore=[], frame=frame, given_hparams=hp)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=None, **kwargs):
        """Lightning's ``load_from_checkpoint``, rebuilding the module from its stored config alone.

        Keyword arguments override stored hyperparameters; one that names an object (``net``,
        ``loss``, ``trunk``...) must describe the same object as the checkpoint's, else ``ValueError``.
        """
        try:
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True if weights_only is None
                              else weights_only)
        except Exception:  # noqa: BLE001 - Lightning's loader below reports it
            ckpt = {}
        saved = dict(ckpt.get("hyper_parameters") or {})
        _check_checkpoint_class(cls, checkpoint_path, ckpt, saved)
        undescribed = saved.pop(UNDESCRIBED, [])
        missing = [k for k in undescribed if k not in kwargs]
        if missing:
            raise ValueError(f"{checkpoint_path}: the checkpoint could not store {', '.join(missing)} as config "
                             f"(an object without a class path); pass {', '.join(f'{k}=...' for k in missing)} "
                             f"to load_from_checkpoint")
        for k in list(kwargs):
            if k in undescribed or k not in saved:
                continue
            stored, given = saved[k], kwargs[k]
            is_object = isinstance(stored, dict) or not isinstance(given, (bool, int, float, type(None))) \
                or k == "loss"
            if not is_object:
                continue
            try:
                given_cfg = to_config(given)
            except NotConfigurable:
                raise ValueError(f"load_from_checkpoint: the checkpoint stores {k}={_short(stored)} and rebuilds it; "
                                 f"the given {k} (a {class_path_of(given)}) cannot be compared with it, so drop the "
                                 f"{k} argument") from None
            if _same(given_cfg, stored):
                del kwargs[k]  # the stored config rebuilds the same object
                continue
            raise ValueError(f"load_from_checkpoint: {k}={_short(given_cfg)} "
                             f"differs from the checkpoint's {k}={_short(stored)}; drop the {k} argument to load the "
                             f"trained {k}")
        if undescribed:
            # Lightning's instantiator would try to build the given objects from config: build the
            # stored ones here and the module directly
            for k, v in saved.items():
                if k not in kwargs and not k.startswith("_"):
                    kwargs[k] = _build(v)
            kwargs["_instantiator"] = None
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)


def _check_checkpoint_class(cls: type, path, ckpt: dict, hparams: dict) -> None:
    """``IMAMLModule.load_from_checkpoint(<a MAMLModule checkpoint>)``: one error naming both classes
    and the call that loads it (a checkpoint of a subclass of ``cls`` loads)."""
    import importlib

    info = ckpt.get("tasklight") if isinstance(ckpt.get("tasklight"), dict) else {}
    saved = info.get("learner") or hparams.get("_class_path")
    if not saved:
        return
    mod, _, name = str(saved).rpartition(".")
    try:
        saved_cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        saved_cls = None
    if saved_cls is not None and isinstance(saved_cls, type) and issubclass(saved_cls, cls):
        return
    if saved_cls is None and name == cls.__qualname__:
        return
    raise ValueError(f"{path} was written by {saved}, not by {cls.__module__}.{cls.__qualname__} (or a subclass): "
                     f"load it with {name}.load_from_checkpoint(path)")


def _normalise(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        if "class_path" in cfg:
            return {"class_path": _canonical(cfg["class_path"]),
                    "init_args": _normalise({**cfg.get("init_args", {}), **cfg.get("dict_kwargs", {})})}
        return {k: _normalise(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_normalise(v) for v in cfg]
    return cfg


def _canonical(path: str) -> str:
    """``tasklight.nn.Conv4`` and ``tasklight.nn.nets.Conv4`` name the same class."""
    mod, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), name)
        return class_path_of(obj) if isinstance(obj, type) else path
    except (ImportError, AttributeError, ValueError):
        return path


def _same(a: Any, b: Any) -> bool:
    a, b = _normalise(a), _normalise(b)
    if isinstance(a, dict) and isinstance(b, dict) and "class_path" in a and "class_path" in b:
        if a["class_path"] != b["class_path"]:
            return False
        keys = set(a["init_args"]) | set(b["init_args"])  # CLI dumps list every default, Python only some
        return all(_same(a["init_args"].get(k, _DEFAULT), b["init_args"].get(k, _DEFAULT)) or
                   _DEFAULT in (a["init_args"].get(k, _DEFAULT), b["init_args"].get(k, _DEFAULT)) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


_DEFAULT = object()


def _short(cfg: Any) -> str:
    if isinstance(cfg, dict) and "class_path" in cfg:
        args = ", ".join(f"{k}={v!r}" for k, v in {**cfg.get("init_args", {}), **cfg.get("dict_kwargs", {})}.items())
        return f"{cfg['class_path'].rsplit('.', 1)[-1]}({args})"
    return repr(cfg)
