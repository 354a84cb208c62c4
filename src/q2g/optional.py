"""Optional dependencies: whether one is installed, and the pip command that installs it (the one
check q2g makes; each heavy package is still imported only where it is used).

    from q2g.optional import is_available, require
    if is_available("liger_kernel"): ...
    require("vllm", "--eval-backend vllm")   # BadInput (exit 2): "... needs the vllm package, ...: pip install ..."
"""

from __future__ import annotations

import importlib.util
import sys

from q2g.errors import BadInput

PIP = {
    "vllm": "pip install 'q2g[vllm]' (Linux with a CUDA GPU)",
    "openai": "pip install 'q2g[openai]'",
    "bitsandbytes": "pip install 'q2g[bnb]'",
    "liger_kernel": "pip install liger-kernel",
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
    "trackio": "pip install trackio",
}


def is_available(package: str) -> bool:
    """Whether `package` can be imported, found without importing it (vLLM takes seconds); one
    imported already, or set to None in sys.modules (as tests hide a package), answers from there."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


def install_hint(package: str) -> str:
    return PIP.get(package, f"pip install {package}")


def require(package: str, what: str, error: type[Exception] = BadInput) -> None:
    """Refuse `what` (a flag and its value) with the pip command when `package` is not installed."""
    if not is_available(package):
        raise error(f"{what} needs the {package} package, which is not installed: {install_hint(package)}")
