"""The ``tasklight`` command: a LightningCLI in subclass mode.

Any LightningModule / LightningDataModule, ours or a user's, is chosen by class path in a YAML
config or on the command line:

    tasklight fit  --config configs/maml_sinusoid.yaml
    tasklight test --config configs/maml_sinusoid.yaml --ckpt_path runs/.../last.ckpt
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from tasklight.core.checkpoint import check_checkpoint_file
from tasklight.strategies import DEFAULT_PROCESS_GROUP_TIMEOUT, timed_strategy


class TasklightCLI(LightningCLI):
    """LightningCLI with tasklight's defaults.

    * ``inference_mode=False``: meta-learners adapt with gradients at validation/test time.
    * W&B runs are offline unless ``WANDB_MODE`` says otherwise (``WANDB_MODE=online`` sends them).
    * ``fit`` ends with a ``test`` on the best (or last) checkpoint so every run prints a final
      metric; ``--test_after_fit false`` turns that off.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after `fit`, run `test` with the fitted weights and print the metrics")
        parser.add_argument("--process_group_timeout", type=float, default=DEFAULT_PROCESS_GROUP_TIMEOUT,
                            help="seconds a DDP collective waits for the other ranks before the run fails "
                                 "(a dead rank then ends the run instead of hanging it)")

    def instantiate_trainer(self, **kwargs):
        timeout = self._get(self.config_init, "process_group_timeout", default=DEFAULT_PROCESS_GROUP_TIMEOUT)
        strategy = (self._get(self.config_init, "trainer", default={}) or {}).get("strategy")
        if isinstance(strategy, str) and "strategy" not in kwargs:
            kwargs["strategy"] = timed_strategy(strategy, timeout)
        return super().instantiate_trainer(**kwargs)

    def _check_ckpt_path(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        path = cfg.get("ckpt_path")
        if path:
            check_checkpoint_file(path)  # names a truncated / corrupted file before Lightning reads it

    def before_fit(self) -> None:
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def after_fit(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if not cfg.get("test_after_fit", True) or self.trainer.interrupted:
            return
        dm = self.datamodule
        has_test = dm is not None and type(dm).test_dataloader is not LightningDataModule.test_dataloader
        if not has_test:
            print("tasklight: the datamodule defines no test_dataloader; skipping the final test.")
            return
        ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=dm, ckpt_path=ckpt)


def run_cli(args: Optional[list[str]] = None) -> TasklightCLI:
    """Run the CLI (``args`` as on the command line) and return it (its trainer, model, datamodule)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return TasklightCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def main(args: Optional[list[str]] = None) -> None:
    """The ``tasklight`` console command."""
    run_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
