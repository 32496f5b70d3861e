"""Start-up checks of the installed stack that would otherwise fail far from their cause.

A torchvision wheel that does not match the installed torch (e.g. PyPI's CUDA build of ``torchvision==0.28.0``
beside the CPU build of ``torch==2.13.0``; ``pip check`` sees nothing wrong) fails on import with
``operator torchvision::nms does not exist``. Transformers imports it whenever it is installed, so every later
``from transformers import ...`` fails with an error that names neither package (``Could not import module
'set_seed'``). SC-Tune never needs torchvision (only the families' chat demos do: the ``demo`` extra, README).
"""

from __future__ import annotations

import importlib.util


class EnvironmentProblem(SystemExit):
    """The installed packages cannot work together; the message says which and how to fix it."""


def check_torchvision() -> None:
    """Exit with a clear message when an installed torchvision cannot be imported beside this torch."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure of torchvision breaks transformers' imports alike
        import torch

        raise EnvironmentProblem(
            f"torchvision is installed but does not load with torch {torch.__version__} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); transformers imports it and would "
            "fail. SC-Tune does not need it: `pip uninstall torchvision`, or install the build that matches your "
            "torch (README, 'Optional extras': the demo extra)"
        ) from None
