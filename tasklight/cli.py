"""The ``tasklight`` command: a LightningCLI in subclass mode.

Any LightningModule / LightningDataModule, ours or a user's, is chosen by class path (tasklight's
own classes also by their short name, ``--model MAMLModule``) in a YAML config or on the command
line; a config shipped with tasklight is found by its name:

    tasklight fit  --config maml_sinusoid
    tasklight test --config maml_sinusoid --ckpt_path runs/maml_sinusoid/latest/checkpoints/last.ckpt
    tasklight predict --config maml_sinusoid --ckpt_path runs/maml_sinusoid/latest/checkpoints/last.ckpt

Every run gets its own folder ``runs/<run name>/<YYYYmmdd-HHMMSS>-<id>/`` (``config.yaml``, the
package versions, ``checkpoints/``; ``runs/<run name>/latest`` points at the newest), so
``last.ckpt`` always means that run.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from tasklight.core.checkpoint import check_checkpoint_file
from tasklight_launch import VERSIONED, package_versions, version_line  # noqa: F401 - re-exported
from tasklight.strategies import DEFAULT_PROCESS_GROUP_TIMEOUT, timed_strategy

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Trainer options that manual optimisation cannot honour, and the module option that does the job
MANUAL_ONLY = {"gradient_clip_val": "clip the gradient norm", "accumulate_grad_batches": "accumulate gradients"}


def _keep_none() -> dict[str, bool]:
    """The jsonargparse option that keeps ``None`` values in a dumped config (``skip_unset`` since
    jsonargparse 4.49, which deprecates the older ``skip_none``)."""
    import jsonargparse

    try:
        major, minor = (int(p) for p in jsonargparse.__version__.split(".")[:2])
    except ValueError:
        major, minor = 4, 49
    return {"skip_unset": False} if (major, minor) >= (4, 49) else {"skip_none": False}


def find_config(value: str) -> str:
    """A ``--config`` value: an existing file, or the name of a config shipped with tasklight."""
    if Path(value).exists() or value.startswith(("{", "[")) or "\n" in value:
        return value
    name = Path(value).name
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return str(cand)
    return value


EXTENDS_KEY = "extends"


def expand_config(value: str, _seen: tuple = ()) -> list[str]:
    """The ``--config`` arguments for one config value: its ``extends:`` chain first, then itself.

    A config may say ``extends: <path>`` (relative to the file): that file is applied first and this
    file's keys on top, exactly as ``--config base.yaml --config this.yaml``: jsonargparse merges
    several ``--config`` flags key by key (a nested ``config:`` key inside a file would replace whole
    groups instead).
    """
    path = Path(find_config(value))
    if not path.is_file():
        return ["--config", value]
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SystemExit(f"tasklight: error: the config {path} is not valid YAML{where} ({problem}): fix its syntax")
    except OSError as err:
        raise SystemExit(f"tasklight: error: cannot read the config {path} ({err.strerror or err})")
    base = content.get(EXTENDS_KEY) if isinstance(content, dict) else None
    if base is None:
        return ["--config", str(path)]
    if not isinstance(base, str):
        raise SystemExit(f"tasklight: error: `{EXTENDS_KEY}:` in {path} must be the path of one config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise SystemExit(f"tasklight: error: {path} extends {base!r}, but {base_path} does not exist")
    if base_path in _seen or base_path == path.resolve():
        raise SystemExit(f"tasklight: error: the `{EXTENDS_KEY}:` chain of {path} loops back to {base_path}")
    return expand_config(str(base_path), _seen + (path.resolve(),)) + ["--config", str(path)]


def _resolve_config_args(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            out += expand_config(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            out += expand_config(a.split("=", 1)[1])
            i += 1
            continue
        out.append(a)
        i += 1
    return out


class RunConfig(SaveConfigCallback):
    """Writes the resolved config into the run's folder (never over another run's) and logs the
    complete config (every class path and init arg, the trainer, the seed) with the package
    versions to every logger (the W&B run's config)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        run_dir = os.environ.get("TASKLIGHT_RUN_DIR")
        if trainer.is_global_zero and run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, os.path.join(run_dir, self.config_filename), overwrite=True,
                             multifile=False, **_keep_none())
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        import yaml

        resolved = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, **_keep_none()))
        resolved.pop("config", None)
        record = {"config": resolved, "versions": package_versions(), "seed": resolved.get("seed_everything"),
                  "run_dir": os.environ.get("TASKLIGHT_RUN_DIR"), "command": " ".join(["tasklight", *sys.argv[1:]])}
        for logger in trainer.loggers:
            logger.log_hyperparams(record)


class TasklightCLI(LightningCLI):
    """LightningCLI with tasklight's defaults.

    * ``inference_mode=False``: meta-learners adapt with gradients at validation/test time.
    * W&B runs are offline unless ``WANDB_MODE`` says otherwise (``WANDB_MODE=online`` sends them).
    * Each run has its own folder; its checkpoints go to ``<run folder>/checkpoints`` unless a
      ``ModelCheckpoint`` names its own ``dirpath``.
    * ``fit`` ends with a ``test`` on the best (or last) checkpoint so every run prints a final
      metric; ``--test_after_fit false`` turns that off.
    """

    _failed = False  # set when a check of ours has reported its error

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=version_line(),
                            help="print the versions of tasklight, torch and lightning and exit")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after `fit`, run `test` with the fitted weights and print the metrics")
        parser.add_argument(f"--{EXTENDS_KEY}", type=Optional[str], default=None,
                            help="in a config file: the config it builds on (applied first, relative to the file)")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="the run folder's name under runs/ (default: the logger's run name or the config's)")

        parser.add_argument("--process_group_timeout", type=float, default=DEFAULT_PROCESS_GROUP_TIMEOUT,
                            help="seconds a DDP collective waits for the other ranks before the run fails "
                                 "(a dead rank then ends the run instead of hanging it)")

    def instantiate_trainer(self, **kwargs):
        timeout = self._get(self.config_init, "process_group_timeout", default=DEFAULT_PROCESS_GROUP_TIMEOUT)
        strategy = (self._get(self.config_init, "trainer", default={}) or {}).get("strategy")
        if isinstance(strategy, str) and "strategy" not in kwargs:
            kwargs["strategy"] = timed_strategy(strategy, timeout)
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        if not trainer_cfg.get("plugins") and "plugins" not in kwargs:
            kwargs["plugins"] = [_checkpoint_io()]
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_cfg.get("enable_progress_bar") is not False and "callbacks" not in kwargs \
                and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            from tasklight.callbacks.progress import EtaProgressBar, LineProgress

            # a redrawn bar in a file or a pipe is megabytes of control codes: plain lines there
            kwargs["callbacks"] = callbacks + [EtaProgressBar() if _is_terminal() else LineProgress()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` before anything else happens (every subcommand).

        The path is resolved once, here (``runs/<name>/latest/...`` means the run ``latest`` points
        at now, before this command makes its own run folder); a missing or unreadable file, a
        checkpoint of another learner class than the config's, or hyperparameters that do not parse
        is one line naming the file and the fix. Lightning then reads the file's hyperparameters.
        """
        sub = self.config.get("subcommand")
        node = self.config.get(sub) if sub else None
        path = node.get("ckpt_path") if node is not None else None
        if not path:
            return
        if str(path) not in LIGHTNING_CKPT_NAMES:
            resolved = os.path.realpath(str(path))
            if not Path(resolved).is_file():
                self._failed = True
                _fail(f"--ckpt_path {path}: no such file{_latest_hint(path)}. Give the path of a .ckpt file "
                      f"(a run's checkpoints are in runs/<run name>/<run>/checkpoints/)")
            node["ckpt_path"] = resolved
            try:
                ckpt = check_checkpoint_file(resolved)
            except (ValueError, OSError) as err:
                self._failed = True
                _fail(f"--ckpt_path {path}: {err}")
            self._ckpt = ckpt
            self._check_learner_class(node, path, ckpt)
            self._check_data_class(node, path, ckpt)
        try:
            _call_without_parse_noise(super()._parse_ckpt_path)
        except SystemExit as err:
            if err.code in (0, None):
                raise
            self._failed = True
            _fail(f"--ckpt_path {path}: the hyperparameters saved in the checkpoint do not fit the config "
                  f"({_last_error_line()}); use the config the checkpoint was trained with "
                  f"(config.yaml in its run folder)")

    def _check_data_class(self, node, path, ckpt) -> None:
        """A checkpoint trained on one DataModule class tested with a config of another (a sinusoid
        checkpoint with an Omniglot config) is one line naming both, not a head-size complaint."""
        if not isinstance(ckpt, dict):
            return
        saved = (ckpt.get("datamodule_hyper_parameters") or {}).get("_class_path")
        if not saved and ckpt.get("datamodule_hyper_parameters") is not None:
            # a checkpoint written by a Python Trainer: the DataModule's state is stored under its class name
            saved = next((k for k in ckpt if isinstance(k, str) and k.endswith("DataModule")), None)
        wanted = _class_of(node.get("data"))
        if saved and wanted is not None and not _same_class(saved, wanted):
            self._failed = True
            _fail(f"--ckpt_path {path} was trained on {saved} but the config's data is "
                  f"{wanted.__module__}.{wanted.__qualname__}: use the config the checkpoint was trained with "
                  f"(config.yaml in its run folder), or pass --data {saved.rsplit('.', 1)[-1]}")

    def _check_learner_class(self, node, path, ckpt) -> None:
        """Refuse a checkpoint of another learner class than the config's model before Lightning
        replaces the config's class with the checkpoint's."""
        if not isinstance(ckpt, dict):
            return
        from tasklight.core.checkpoint import KEY

        info = ckpt.get(KEY) if isinstance(ckpt.get(KEY), dict) else {}
        saved = info.get("learner") or (ckpt.get("hyper_parameters") or {}).get("_class_path")
        wanted = _class_of(node.get("model"))
        if not saved or wanted is None:
            return
        mine = f"{wanted.__module__}.{wanted.__qualname__}"
        if not _same_class(saved, wanted):
            self._failed = True
            _fail(f"--ckpt_path {path} was written by {saved} but the config's model is {mine}: use the config "
                  f"the checkpoint was trained with (--model {saved.rsplit('.', 1)[-1]}, or config.yaml in its run "
                  f"folder), or a checkpoint of {wanted.__qualname__}")

    # ------------------------------------------------------------------ checks before building
    def _sub(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._sub()
        model_cls = _class_of(cfg.get("model"))
        from tasklight.config import SelfDescribing

        if model_cls is not None and issubclass(model_cls, SelfDescribing):
            import inspect

            params = inspect.signature(model_cls.__init__).parameters
            for flag, what in MANUAL_ONLY.items():
                value = cfg.get("trainer", {}).get(flag)
                if value is None or (flag == "accumulate_grad_batches" and value == 1):
                    continue
                if flag == "gradient_clip_val":
                    option = next((o for o in ("clip_grad_norm", "gradient_clip_val") if o in params), "clip_grad_norm")
                    fix = f"use --model.init_args.{option} {value} (the module's own clipping) instead"
                else:
                    fix = "use a larger meta-batch / batch size instead (the module steps once per batch)"
                _fail(f"--trainer.{flag}={value}: {model_cls.__name__} optimises manually and the Trainer cannot "
                      f"{what} for it; {fix}")
        self._head_follows_n_way(cfg)
        self._prepare_run_dir(cfg)

    def parse_arguments(self, parser, args) -> None:
        raw = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, tuple, type(None))) else []
        self._raw_args = raw
        printing = [a for a in raw if a == "--print_config" or a.startswith("--print_config=")]
        if printing:
            # --print_config prints while parsing: find the head size first, then print it as it will run
            fill = None
            try:
                super().parse_arguments(parser, [a for a in raw if a not in printing])
                sub = self.config.get("subcommand")
                fill = self._n_way_fill(self.config.get(sub, self.config) if sub else self.config)
            except SystemExit:
                if self._failed:  # our own one-line error; any other is reported by the parse below
                    raise
            if fill is not None:
                args = raw + ["--model.init_args.net.init_args.out_features", str(fill)]
        if isinstance(args, (list, tuple, type(None))):
            args = _give_file_loggers_a_folder(list(raw if args is None else args))
        try:
            _call_without_parse_noise(lambda: super(TasklightCLI, self).parse_arguments(parser, args))
        except SystemExit as err:
            if err.code in (0, None) or self._failed:
                sys.stderr.write(_captured_stderr[0])
                raise
            self._failed = True
            _fail(_parse_error_line(_captured_stderr[0], raw))
        if printing or any(a in ("-h", "--help") for a in raw):
            sys.stderr.write(_captured_stderr[0])

    def _head_follows_n_way(self, cfg) -> None:
        """The classifier head's ``out_features`` follows the episodes' ``n_way``.

        jsonargparse's ``link_arguments`` cannot do this here: in subclass mode the net is a nested
        subclass of a subclass (``model.init_args.net.init_args``) whose keys the parser only knows
        after parsing, a learner's net may have no ``out_features`` (prototype learners embed), a
        DataModule may have no ``n_way`` (sinusoid), and a link target can no longer be set by the
        user. So: when the model is a classifier (``net_is_classifier``), the data has an integer
        ``n_way`` and the net a parameter ``out_features`` that no config file or flag sets, it is
        set to ``n_way``; one that is set (or comes from ``--ckpt_path``'s checkpoint) and differs is an
        error naming both settings.
        """
        fill = self._n_way_fill(cfg)
        if fill is not None:
            init = _init_arg(cfg.get("model"), "net")
            init = init.get("init_args") if isinstance(init, dict) else init.init_args
            if isinstance(init, dict):
                init["out_features"] = fill
            else:
                init.out_features = fill

    def _n_way_fill(self, cfg) -> Optional[int]:
        """The ``out_features`` to give the net (see ``_head_follows_n_way``), or None to leave it."""
        model_cls = _class_of(cfg.get("model"))
        if model_cls is None or not getattr(model_cls, "net_is_classifier", False):
            return None
        data = cfg.get("data")
        n_way = _init_arg(data, "n_way")
        net = _init_arg(cfg.get("model"), "net")
        net_cls = _class_of(net)
        if not isinstance(n_way, int) or isinstance(n_way, bool) or net_cls is None:
            return None
        import inspect

        try:
            params = inspect.signature(net_cls.__init__).parameters
        except (TypeError, ValueError):
            return None
        init = net.get("init_args") if isinstance(net, dict) else getattr(net, "init_args", None)
        if "out_features" not in params or init is None:
            return None
        current = init.get("out_features") if isinstance(init, dict) else getattr(init, "out_features", None)
        # a checkpoint's net (its hyperparameters, parsed into the config) is as explicit as a flag
        flagged = explicitly_set(getattr(self, "_raw_args", []), "model.net.out_features")
        if flagged or cfg.get("ckpt_path"):
            if current != n_way and not flagged:
                self._failed = True
                _fail(f"--ckpt_path {cfg.get('ckpt_path')} holds a head with {current} outputs "
                      f"({current}-way episodes) but --data.init_args.n_way is {n_way}: evaluate it on the episodes "
                      f"it was trained for (--data.init_args.n_way {current}, or the config.yaml of its run folder)")
            if current != n_way:
                self._failed = True
                _fail(f"--model.init_args.net.init_args.out_features={current} but --data.init_args.n_way={n_way}: "
                      f"{model_cls.__name__}'s head needs one logit per class of an episode; leave out_features "
                      f"unset (it follows n_way) or set it to {n_way}")
            return None
        return n_way

    def _prepare_run_dir(self, cfg) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("TASKLIGHT_RUN_DIR"):
            return  # a DDP child process: the launcher's run folder
        name = cfg.get("run_name")
        if name is not None:
            check_run_name(name)
        trainer_cfg = cfg.get("trainer", {}) or {}
        logger = trainer_cfg.get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        for lg in loggers:
            init = getattr(lg, "init_args", None) or (lg.get("init_args") if isinstance(lg, dict) else None)
            if not name and init is not None and init.get("name") and init.get("name") != _default_name(lg):
                name = init.get("name")
                if "/" in str(name) or "\\" in str(name) or str(name) in (".", ".."):
                    name = Path(str(name).replace("\\", "/")).name or "run"
        if not name:
            configs = cfg.get("config") or []
            if configs:
                name = Path(str(configs[-1])).stem
        if not name:
            model = cfg.get("model")
            name = getattr(model, "class_path", "run").rsplit(".", 1)[-1] if model is not None else "run"
        root = Path(os.environ.get("TASKLIGHT_RUNS", "runs"))
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        ckpt_run = checkpoint_run_folder(cfg.get("ckpt_path")) if self.subcommand != "fit" else None
        # test / validate / predict of a checkpoint of a tasklight run: a folder inside that run
        run_dir = ckpt_run / f"{self.subcommand}-{stamp}" if ckpt_run is not None else root / name / stamp
        self._ckpt_run = ckpt_run
        for lg in loggers:  # file loggers without a folder of their own write into the run folder
            init = getattr(lg, "init_args", None)
            if init is not None and _class_of(lg) is not None and "save_dir" in init \
                    and init.get("save_dir") in (None, str(root)) and type(lg).__name__ == "Namespace" \
                    and _class_of(lg).__name__ in FILE_LOGGERS:
                init["save_dir"] = str(run_dir)
        os.environ["TASKLIGHT_RUN_DIR"] = str(run_dir)
        self.run_dir = run_dir

    # ------------------------------------------------------------------ one-line constructor errors
    def instantiate_classes(self) -> None:
        from tasklight import config as tlconfig

        tlconfig.constructor_errors.clear()
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - reported as one line when it is ours
            if tlconfig.constructor_errors and not os.environ.get("TASKLIGHT_TRACEBACK"):
                cls_name, ours = tlconfig.constructor_errors[-1]
                text = ours if str(ours).startswith(f"{cls_name}:") else f"{cls_name}: {ours}"
                _fail(f"{text}  (TASKLIGHT_TRACEBACK=1 shows the traceback)")
            raise err
        for logger in self.trainer.loggers:
            quiet_wandb_logger(logger)
        run_dir = getattr(self, "run_dir", None) or Path(os.environ["TASKLIGHT_RUN_DIR"])
        self.trainer.tasklight_run_dir = str(run_dir)  # where tasklight.plots saves figures (also with W&B)
        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(run_dir / "checkpoints")
                if cb.save_last is None:
                    cb.save_last = True  # every run has its last.ckpt
        ckpt_run = getattr(self, "_ckpt_run", None)
        for logger in self.trainer.loggers:
            init = getattr(logger, "_wandb_init", None)
            if ckpt_run is not None and isinstance(init, dict) and getattr(logger, "_experiment", None) is None:
                init.setdefault("group", f"{ckpt_run.parent.name}/{ckpt_run.name}")  # beside the run it evaluates
                init.setdefault("job_type", self.subcommand)
        if self.subcommand == "fit":
            self.trainer.callbacks.append(_PointLatest(self))

    # ------------------------------------------------------------------ run reporting
    def _announce(self) -> None:
        if not self.trainer.is_global_zero:
            return
        run_dir = Path(os.environ.get("TASKLIGHT_RUN_DIR", "runs"))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _fail(f"cannot create the run folder {run_dir} ({err.strerror or err}): run tasklight from a folder "
                  f"you can write to, or set TASKLIGHT_RUNS to a writable folder")
        if self.subcommand == "fit":
            note = f"{run_dir.parent / 'latest'} will point here once it has written a checkpoint"
        elif getattr(self, "_ckpt_run", None) is not None:
            note = f"inside the checkpoint's run; {run_dir.parent.parent / 'latest'} is left as it is"
        else:
            note = f"{run_dir.parent / 'latest'} is left as it is"
        print(f"tasklight: run folder {run_dir} ({note})", flush=True)
        if self.subcommand in ("test", "validate", "predict") and not self._sub().get("ckpt_path"):
            print(f"tasklight: warning: `{self.subcommand}` without --ckpt_path evaluates the model the config "
                  f"builds, with untrained weights; pass --ckpt_path runs/<run name>/latest/checkpoints/last.ckpt",
                  file=sys.stderr, flush=True)

    def point_latest(self, force: bool = False) -> None:
        """Point ``runs/<name>/latest`` at this fit's run folder, once the run has a checkpoint
        (``force``: at the end of a successful fit); a run that fails earlier leaves it alone."""
        if getattr(self, "_latest_done", False) or self.subcommand != "fit" or not self.trainer.is_global_zero:
            return
        saved = any(Path(p).is_file() for cb in self.trainer.checkpoint_callbacks
                    for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")) if p)
        if not (saved or force):
            return
        run_dir = Path(os.environ.get("TASKLIGHT_RUN_DIR", "runs"))
        if run_dir.is_dir():
            _repoint_latest(run_dir)
        self._latest_done = True

    def before_fit(self) -> None:
        self._announce()

    def before_test(self) -> None:
        self._announce()

    def before_validate(self) -> None:
        self._announce()

    def before_predict(self) -> None:
        self._announce()

    def _report(self) -> None:
        if not self.trainer.is_global_zero:
            return
        for cb in self.trainer.checkpoint_callbacks:
            last = getattr(cb, "last_model_path", "") or ""
            best = getattr(cb, "best_model_path", "") or ""
            if not last and cb.dirpath and (Path(cb.dirpath) / "last.ckpt").is_file():
                last = str(Path(cb.dirpath) / "last.ckpt")
            if last or best:
                print(f"tasklight: checkpoints: last {last or '-'}, best {best or '-'}", flush=True)
            if self.subcommand == "fit" and getattr(cb, "monitor", None) and not best:
                print(f"tasklight: no best checkpoint: {cb.monitor!r} was never logged ({_why_no_validation(self.trainer)})",
                      flush=True)
        run_dir = Path(os.environ.get("TASKLIGHT_RUN_DIR", "runs"))
        plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
        if plots:
            print(f"tasklight: figures: {len(plots)} in {run_dir / 'plots'}", flush=True)
        elif self.subcommand == "fit" and not self.trainer.sanity_checking:
            print(f"tasklight: no figures: {_why_no_figures(self)}", flush=True)
        for logger in self.trainer.loggers:
            exp = getattr(logger, "_experiment", None)
            if type(logger).__name__ == "WandbLogger" and exp is not None and getattr(exp, "dir", None):
                wandb_dir = Path(exp.dir).parent
                mode = os.environ.get("WANDB_MODE", "online")
                print(f"tasklight: W&B run {exp.id} ({mode}) in {wandb_dir}", flush=True)
                if mode in ("offline", "dryrun"):  # dryrun: the older name wandb itself may set
                    print(f"tasklight: upload it with: wandb sync {wandb_dir}", flush=True)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("test", "validate") and kwargs.pop("verbose", True):
            self._print_table = True
        if subcommand in ("test", "validate"):
            kwargs["verbose"] = False  # tasklight prints the table, sorted numerically
        return kwargs

    def _print_metrics(self, stage: str) -> None:
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        if metrics:
            print(metric_table(metrics, f"{stage} metric"), flush=True)

    def after_fit(self) -> None:
        self.point_latest()
        cfg = self._sub()
        if cfg.get("test_after_fit", True) and not self.trainer.interrupted:
            dm = self.datamodule
            has_test = dm is not None and type(dm).test_dataloader is not LightningDataModule.test_dataloader
            if not has_test:
                print("tasklight: the datamodule defines no test_dataloader; skipping the final test.")
            else:
                ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
                self.trainer.test(self.model, datamodule=dm, ckpt_path=ckpt, verbose=False)
                self._print_metrics("test")
        self.point_latest(force=True)
        self._report()

    def after_test(self) -> None:
        if getattr(self, "_print_table", False):
            self._print_metrics("test")
        self._report()

    def after_validate(self) -> None:
        if getattr(self, "_print_table", False):
            self._print_metrics("val")
        self._report()

    def after_predict(self) -> None:
        path = write_predictions(self.trainer, self.model, Path(os.environ.get("TASKLIGHT_RUN_DIR", "runs")),
                                 self._sub().get("ckpt_path"))
        if path is not None:
            print(f"tasklight: predictions written to {path} (read with torch.load(path, weights_only=True); "
                  f"format: README, `tasklight predict`)", flush=True)
        else:
            print("tasklight: warning: predict returned no predictions to this process (a spawned DDP "
                  "strategy keeps them in its workers), so no predictions file was written: run predict on "
                  "one process (--trainer.devices 1 --trainer.strategy auto)", file=sys.stderr, flush=True)
        self._report()


#: loggers that write files and take a ``save_dir`` (the run folder when none is given)
FILE_LOGGERS = ("CSVLogger", "TensorBoardLogger")


class _PointLatest(Callback):
    """Points ``runs/<name>/latest`` at the fit's run folder as soon as a checkpoint exists in it."""

    def __init__(self, cli: "TasklightCLI") -> None:
        self.cli = cli

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.cli.point_latest()

    def on_train_end(self, trainer, pl_module) -> None:
        self.cli.point_latest()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.cli.point_latest()


def check_run_name(name) -> None:
    """A ``--run_name`` is one folder name under ``runs/``: no path separators, no ``..``."""
    text = str(name)
    if not text.strip() or "/" in text or "\\" in text or text in (".", "..") or text.startswith("~") \
            or any(ord(c) < 32 for c in text):
        _fail(f"--run_name {text!r} is not a folder name: a run's folder is runs/<run name>/, so give a name "
              f"without '/', '\\' or '..' (e.g. --run_name {Path(text.replace(chr(92), '/')).name or 'my_run'})")


def checkpoint_run_folder(ckpt_path) -> Optional[Path]:
    """The tasklight run folder that holds ``ckpt_path`` (``<run>/checkpoints/x.ckpt`` with a
    ``<run>/config.yaml``), or None."""
    if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_NAMES:
        return None
    p = Path(os.path.realpath(str(ckpt_path)))
    run = p.parent.parent
    if p.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run
    return None


def _repoint_latest(run_dir: Path) -> None:
    """Make ``run_dir.parent / "latest"`` a relative link to ``run_dir`` (replaced atomically)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{secrets.token_hex(4)}"
    try:
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def write_predictions(trainer: Trainer, model, run_dir: Path, ckpt_path) -> Optional[Path]:
    """Write what ``predict`` returned to ``<run folder>/predictions.pt`` (atomically; one file per
    rank under DDP: ``predictions-rank<r>.pt`` for the ranks after 0).

    The file holds plain containers of tensors (``torch.load(path, weights_only=True)``):
    ``{"learner": class path, "ckpt_path": str or None, "batches": [one entry per predict batch]}``,
    each entry what the learner's ``predict_step`` returns (meta-learners: ``{"predictions": [T, Q, ...],
    "query_y": [T, Q]}``; ``MultiTaskModule``: ``{"predictions": [per task], "task": [...], "rows": [...]}``;
    TaskMet and its baselines: the predictor's outputs ``[N, ...]``).
    """
    import torch

    preds = trainer.predict_loop.predictions
    if preds is None:
        return None
    rank = trainer.global_rank
    path = run_dir / ("predictions.pt" if rank == 0 else f"predictions-rank{rank}.pt")
    record = {"learner": f"{type(model).__module__}.{type(model).__qualname__}",
              "ckpt_path": None if ckpt_path is None else str(ckpt_path), "batches": _detached(preds)}
    save_atomically(record, path, what="predictions")
    return path


def _detached(tree):
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _detached(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_detached(v) for v in tree]
    return tree


def save_atomically(obj, path: Path, what: str = "file") -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a failed write (a full disk)
    leaves no truncated file, and raises one ``OSError`` naming the file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OSError(err.errno, f"could not write the {what} {path} ({err.strerror or err}); nothing was left "
                                 f"behind: free disk space or write elsewhere") from err


def _why_no_validation(trainer: Trainer) -> str:
    every = trainer.check_val_every_n_epoch
    if trainer.limit_val_batches == 0 or trainer.num_val_batches == [0]:
        return "validation is off (limit_val_batches 0)"
    if isinstance(trainer.val_check_interval, int) or every is None:
        first = int(trainer.val_check_batch)
    else:
        first = int(every * trainer.num_training_batches * float(trainer.val_check_interval))
    return (f"the first validation comes after {first} steps and the run stopped at step {trainer.global_step}: "
            f"raise --trainer.max_steps, or validate sooner with --trainer.val_check_interval N")


def _why_no_figures(cli) -> str:
    if not cli.trainer.loggers:
        return "the run has no logger (--trainer.logger false); figures go to the run folder of a logged run"
    if cli._sub().get("test_after_fit", True) is False:
        return "figures are drawn at the end of a test, and --test_after_fit false skipped it"
    return f"{type(cli.model).__name__} draws none for this data"


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: ``mse@5`` before ``mse@10``."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def metric_table(metrics: dict[str, float], header: str = "metric") -> str:
    """A plain two-column table of ``metrics`` in natural order."""
    names = sorted(metrics, key=natural_key)
    width = max(len(header), *(len(n) for n in names))
    lines = [f"{header:<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{n:<{width}}  {metrics[n]:.6g}" for n in names]
    return "\n".join(lines)


def _init_arg(node, name: str):
    """``node.init_args.<name>`` of a class_path/init_args node (Namespace or dict), else None."""
    if node is None:
        return None
    init = node.get("init_args") if isinstance(node, dict) else getattr(node, "init_args", None)
    if init is None:
        return None
    return init.get(name) if isinstance(init, dict) else getattr(init, name, None)


def _option_paths(tree, prefix: tuple = ()) -> set[tuple]:
    """Every key path of a nested dict, with the ``init_args`` levels left out."""
    out = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            path = prefix if k == "init_args" else prefix + (str(k),)
            if path:
                out.add(path)
            out |= _option_paths(v, path)
    return out


def explicitly_set(args: list[str], key: str) -> bool:
    """Whether a config file or a flag among ``args`` (as the CLI receives them) sets ``key``, a dotted
    path without ``init_args`` (``model.net.out_features`` matches
    ``--model.init_args.net.init_args.out_features 5``, ``--model.net.out_features=5``, a YAML file
    with ``model: {init_args: {net: {init_args: {out_features: 5}}}}`` and a dict-valued ``--model.net``)."""
    import yaml

    want = tuple(key.split("."))
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            i += 1
            continue
        flag, eq, value = a[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            i += 1
        i += 1
        if flag in ("config", "c") and value is not None:
            try:
                text = Path(value).read_text() if Path(value).is_file() else value
                tree = yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError):
                continue
            if want in _option_paths(tree):
                return True
            continue
        path = tuple(part for part in flag.rstrip("+").split(".") if part != "init_args")
        if path == want or path[:len(want)] == want:
            return True
        if value is not None and want[:len(path)] == path:
            try:
                tree = yaml.safe_load(value)
            except yaml.YAMLError:
                continue
            if want[len(path):] and tuple(want[len(path):]) in _option_paths(tree):
                return True
    return False


def _class_of(node) -> Optional[type]:
    path = getattr(node, "class_path", None) if node is not None else None
    if path is None and isinstance(node, dict):
        path = node.get("class_path")
    if not path:
        return None
    import importlib

    mod, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return None


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
_captured_stderr = [""]


def _latest_hint(path) -> str:
    """Why a path through ``runs/<name>/latest`` may be missing."""
    parts = Path(str(path)).parts
    if "latest" not in parts:
        return ""
    latest = Path(*parts[:parts.index("latest") + 1])
    if not latest.exists():
        return f" ({latest} does not exist: no run of that name has written a checkpoint in this folder)"
    return f" ({latest} points at {os.path.realpath(latest)})"


def _call_without_parse_noise(fn):
    """Run ``fn`` with stderr captured (jsonargparse prints the usage and a long error before
    exiting); the text is kept for :func:`_last_error_line`."""
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            return fn()
    finally:
        _captured_stderr[0] = buf.getvalue()


def _last_error_line() -> str:
    lines = [ln.strip() for ln in _captured_stderr[0].splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    line = (errors or lines or ["no message"])[-1]
    line = line.split("error:", 1)[-1].strip()
    return line if len(line) < 300 else line[:297] + "..."


def _default_name(logger_node) -> Optional[str]:
    """The default of a logger class's ``name`` argument (CSVLogger's ``lightning_logs``): not a run name."""
    import inspect

    cls = _class_of(logger_node)
    try:
        param = inspect.signature(cls.__init__).parameters.get("name") if cls is not None else None
    except (TypeError, ValueError):
        return None
    return param.default if param is not None and param.default is not inspect.Parameter.empty else None


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _same_class(saved: str, wanted: type) -> bool:
    """Whether the class path ``saved`` (as a checkpoint records it) names the class ``wanted``."""
    saved_cls = _class_of({"class_path": saved})
    return saved_cls is wanted if saved_cls is not None else saved.rsplit(".", 1)[-1] == wanted.__qualname__


def _give_file_loggers_a_folder(args: list[str]) -> list[str]:
    """``--trainer.logger CSVLogger`` (or TensorBoardLogger) on the command line without a
    ``save_dir``: give it the runs folder (the run's own folder once that is known)."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--trainer.logger=") else (
            args[i + 1] if a == "--trainer.logger" and i + 1 < len(args) else None)
        if value and value.rsplit(".", 1)[-1] in FILE_LOGGERS and not any("save_dir" in b for b in args):
            return args + ["--trainer.logger.init_args.save_dir", os.environ.get("TASKLIGHT_RUNS", "runs")]
    return args


def _parse_error_line(text: str, raw: list[str]) -> str:
    """One line, naming the setting and the fix, for jsonargparse's error report (the usage, then a
    multi-line error)."""
    import re

    body = text.split("\nerror:", 1)[1] if "\nerror:" in text else text.split("error:", 1)[-1]
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else "the arguments do not parse"
    key_m = re.search(r'Parser key "([^"]+)"', body)
    key = key_m.group(1) if key_m else None
    given_m = re.search(r"Given value: (.*)", body)
    given = given_m.group(1).strip() if given_m else None
    nested = re.match(r"NestedArg\(key='([\w.]+)', val='([^']*)'\)", given or "")
    if nested and key:
        key, given = f"{key}.{nested.group(1)}", nested.group(2)
    setting = f"--{key}" + (f" {given}" if given else "") if key else "the arguments"
    missing_file = re.search(r"File does not exist: '([^']+)'", body)
    if missing_file:
        return (f"{setting.split(' ')[0]} {missing_file.group(1)}: no such file, and no config of that name is shipped "
                f"with tasklight (the shipped ones are in {CONFIG_DIR}); check the path")
    if "does not correspond to a subclass of" in body:
        base = re.search(r"subclass of (\w+)", body).group(1)
        return f"{setting}: {given} is not a {base}: give the class path of a {base} subclass"
    reason = next((ln.split(":", 1)[-1].strip() for ln in lines if "No module named" in ln), None)
    attr = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", body)
    if reason or attr or "Expected a dot import path string" in body or "Problem with given class_path" in body:
        if attr:
            why = f"{attr.group(1)} has no class {attr.group(2)}"
        elif reason:
            why = f"importing it fails: No module named {reason.split('named', 1)[-1].strip()}"
        elif given and "." not in given:
            why = "not a class tasklight knows by its short name"
        else:
            why = "it cannot be imported"
        return (f"{setting}: {why}. Give the full class path (my_pkg.MyClass) of a package that is importable from "
                f"here: run from the folder that holds it, pip install -e your project, or add it to PYTHONPATH")
    m = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", body)
    if m and key:
        return f"--{key} {m.group(2).strip()}: expected a value of type {m.group(1)}"
    if "Problems parsing config" in body or "Unable to load config" in body:
        cfg = next((raw[i + 1] for i, a in enumerate(raw[:-1]) if a in ("--config", "-c")), None)
        return f"a config does not parse{f' ({cfg})' if cfg else ''}: {first}"
    subtypes = re.search(r"Subtypes: \[(.*)\]", body)
    if subtypes and key:
        names = [n for n in re.findall(r"<class '([\w.]+)'>", subtypes.group(1)) if n != "NoneType"]
        return f"{setting}: expected a value of type {' or '.join(n.rsplit('.', 1)[-1] for n in names)}"
    if key and len(lines) > 1:
        detail = next((ln.lstrip("- ") for ln in lines[1:] if not ln.startswith(("Subtypes", "Errors", "Given"))), "")
        return f"{setting}: {detail} (tasklight <subcommand> --help lists the options)"
    return f"{first} (tasklight <subcommand> --help lists the options)"


def _fail(message: str) -> None:
    print(f"tasklight: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def quiet_wandb_logger(logger) -> None:
    """Lightning's ``WandbLogger`` always passes ``anonymous`` to ``wandb.init`` (``None`` unless set),
    and wandb >= 0.19 warns on every run that the setting has no effect: drop it when it was not set.
    A logger whose experiment already exists, or any other logger, is left as it is."""
    init = getattr(logger, "_wandb_init", None)
    if (type(logger).__name__ == "WandbLogger" and isinstance(init, dict) and init.get("anonymous", False) is None
            and getattr(logger, "_experiment", None) is None):
        del init["anonymous"]


class _DropTips:
    """Lightning's advertising tips (litlogger, litmodels) are not about the run."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("\U0001f4a1 Tip")


def _quiet_known_warnings() -> None:
    """Silence messages that do not apply to tasklight's runs (each checked to be harmless here)."""
    import logging

    # tasklight's episode streams split their work across DataLoader workers themselves, so their
    # length is exact for any num_workers
    warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
    # lightning 2.6's own use of torch.utils._pytree on torch >= 2.13
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # a resumed, tested or predicting run has its own folder: that its checkpoint came from another
    # folder is the design, not a problem
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from .*")
    # `run_cli(args)` is the documented way to run the CLI from Python (tests, notebooks)
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within.*")
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropTips) for f in handler.filters):
            handler.addFilter(_DropTips())


def run_cli(args: Optional[list[str]] = None) -> TasklightCLI:
    """Run the CLI (``args`` as on the command line) and return it (its trainer, model, datamodule)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    _quiet_known_warnings()
    args = _resolve_config_args(list(sys.argv[1:] if args is None else args))
    from tasklight.multitask.registry import expand_weighting_names

    args = expand_weighting_names(args)  # --model.init_args.weighting gradvac: a registered short name
    return TasklightCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"inference_mode": False},
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def main(args: Optional[list[str]] = None) -> None:
    """The ``tasklight`` console command: errors are one line naming the setting and the fix
    (``TASKLIGHT_TRACEBACK=1`` shows the traceback)."""
    args = list(sys.argv[1:] if args is None else args)
    if args == ["--version"]:
        print(version_line())
        return
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # your own classes from the current folder, as `python -m` finds them
    if args and args[0] == "embed":
        from tasklight.task2vec.embed_cli import main as embed_main

        _one_line_errors(lambda: embed_main(args[1:]))  # the console script exits with main's return value
        return
    _one_line_errors(lambda: run_cli(args))


def _one_line_errors(fn):
    if os.environ.get("TASKLIGHT_TRACEBACK"):
        return fn()
    try:
        return fn()
    except KeyboardInterrupt:
        print("tasklight: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
    except Exception as err:  # noqa: BLE001 - the console command reports one line
        print(f"tasklight: error: {error_line(err)}  (TASKLIGHT_TRACEBACK=1 shows the traceback)",
              file=sys.stderr, flush=True)
        raise SystemExit(1)


def error_line(err: BaseException) -> str:
    """One line for an exception that ended a run, with the fix where the cause is known."""
    import errno

    msg = " ".join(str(err).split()) or type(err).__name__
    name = type(err).__name__
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"{msg}" if "free disk space" in msg else f"no space left on device ({msg}): free disk space"
    if isinstance(err, PermissionError) or isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS):
        return (f"{msg}: run from a folder you can write to, or point TASKLIGHT_RUNS (run folders) and "
                f"TASKLIGHT_CACHE (caches) at writable folders")
    lower = msg.lower()
    if ("gpu" in lower or "cuda" in lower) and any(w in lower for w in ("not available", "no supported", "not found",
                                                                       "found!", "no nvidia", "no gpu")):
        return (f"{msg.split('. ')[0]}: this config asks for a GPU and none is visible; on a CPU use the config "
                f"without `_gpu`, or --trainer.accelerator cpu --trainer.devices 1")
    if isinstance(err, (ImportError, ModuleNotFoundError)):
        return f"{name}: {msg}: make the package importable (pip install -e <your project>, or add it to PYTHONPATH)"
    return f"{name}: {msg}"


def _checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints are written to a temporary file and renamed: a full disk or a killed process
        never leaves a truncated ``.ckpt``."""

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if "://" in str(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            save_atomically(checkpoint, Path(path), what="checkpoint")

    return AtomicCheckpointIO()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
