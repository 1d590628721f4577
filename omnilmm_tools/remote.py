"""Import the flat remote-code files of the repository root as one package.

The remote-code files use relative imports (``from .resampler import Resampler``), exactly as
transformers' dynamic-module loader expects; here they are made importable locally as the
package ``omnilmm_remote`` so that tools and tests can use them without a model folder.
"""

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "omnilmm_remote"
REMOTE_CODE_FILES = (
    "configuration_omnilmm.py",
    "resampler.py",
    "modeling_omnilmm.py",
    "image_processing_omnilmm.py",
    "processing_omnilmm.py",
)


def remote_module(name: str) -> types.ModuleType:
    """Return the remote-code module ``name`` (e.g. ``"modeling_omnilmm"``)."""
    if not (ROOT / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"The remote-code file {name}.py is not in {ROOT}; install this project with "
            "`pip install -e .` from its checkout."
        )
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")
