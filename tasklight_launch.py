"""The ``tasklight`` console command's entry point.

``tasklight --version`` answers from the installed packages' metadata without importing torch or
lightning (a fraction of a second); every other command goes to :func:`tasklight.cli.main`.
"""
from __future__ import annotations

import sys
from typing import Optional

#: packages whose versions every run records
VERSIONED = ("tasklight", "torch", "lightning", "torchmetrics", "jsonargparse", "wandb", "numpy", "higher")


def package_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def version_line() -> str:
    """``tasklight 0.1.0 (torch 2.14.1, lightning 2.6.6, python 3.11.7)``."""
    v = package_versions()
    return (f"tasklight {v.get('tasklight', '0+unknown')} (torch {v.get('torch', '-')}, "
            f"lightning {v.get('lightning', '-')}, python {v['python']})")


def main(args: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    if args == ["--version"]:
        print(version_line())
        return
    from tasklight.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    main()
