"""Import the flat remote-code files of the repository root as one package.

The remote-code files use relative imports (``from .resampler import Resampler``), exactly as
transformers' dynamic-module loader expects; here they are made importable locally as the
package ``omnilmm_remote`` so that tools and tests can use them without a model folder.
"""

import importlib
import sys
import types
from pathlib import Path

# The Hub files (remote code, tokenizer_config.json, demo_model/, assets/): package data in an installed wheel,
# the repository root in a checkout (an editable install included).
_PACKAGE_DATA = Path(__file__).resolve().parent / "hub"
ROOT = _PACKAGE_DATA if (_PACKAGE_DATA / "modeling_omnilmm.py").is_file() else Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "demo_model"  # the commands' default model
PACKAGE = "omnilmm_remote"
REMOTE_CODE_FILES = (
    "configuration_omnilmm.py",
    "resampler.py",
    "modeling_omnilmm.py",
    "image_processing_omnilmm.py",
    "video_processing_omnilmm.py",
    "processing_omnilmm.py",
)


def remote_module(name: str) -> types.ModuleType:
    """Return the remote-code module ``name`` (e.g. ``"modeling_omnilmm"``)."""
    if not (ROOT / f"{name}.py").is_file():
        raise FileNotFoundError(
            f"The remote-code file {name}.py is not in {ROOT}: a broken install; reinstall the omnilmm-hf package "
            "(`pip install --force-reinstall omnilmm-hf`, or `pip install -e .` in its checkout)."
        )
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")
