"""Import onnxruntime and its on-device training API without importing torch.

Why it exists: with the ``onnxruntime-training`` build, ``import onnxruntime`` runs a
package check that imports ``onnxruntime.training.ortmodule`` (hence torch, when installed),
and ``onnxruntime.training``'s own ``__init__`` imports torch-dependent modules, so
``import onnxruntime.training.api`` fails without torch (onnxruntime's GitHub issue 22070)
and pulls torch in with it. The edge must never load torch. The route, which
tests/test_bundle.py runs in a process where torch cannot load: mark
``ortmodule`` as absent, register an empty ``onnxruntime.training`` package whose search
path is the real directory (its ``__init__`` never runs), then import ``.api`` from it,
which needs only numpy and the compiled core.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

_TRAINING = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"  # the torch front end; never wanted on the edge


def onnxruntime() -> types.ModuleType:
    """The ``onnxruntime`` module, imported without its torch-importing package check."""
    if "onnxruntime" not in sys.modules:
        sys.modules.setdefault(_ORTMODULE, None)  # None in sys.modules: importing it raises ImportError
    return importlib.import_module("onnxruntime")


def training_api() -> types.ModuleType:
    """``onnxruntime.training.api`` (``Module``, ``Optimizer``, ``CheckpointState``)."""
    ort = onnxruntime()
    if _TRAINING not in sys.modules:
        directory = Path(ort.__file__).parent / "training"
        if not (directory / "api").is_dir():
            raise ImportError(
                "the ort-training edge engine needs the onnxruntime-training build "
                "(pip install 'splitft[edge-training]', x86_64 and Python <= 3.11); "
                f"{ort.__file__} is plain onnxruntime: export the bundle with --engine onnx instead"
            )
        package = types.ModuleType(_TRAINING, "onnxruntime training APIs (empty: __init__ skipped)")
        package.__path__ = [str(directory)]
        package.__package__ = _TRAINING
        package.__spec__ = importlib.machinery.ModuleSpec(_TRAINING, None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__
        sys.modules[_TRAINING] = package
        ort.training = package
    return importlib.import_module(f"{_TRAINING}.api")
