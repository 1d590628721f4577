"""What the console commands share: an argument parser whose errors are one line, argument types, a free port."""

import argparse
import socket
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a help text once: not when the text names its default already, nor for no default."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == []
        if "default" in text or nothing or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (`prog: error: ... (see --help)`), no usage dump."""

    def __init__(self, prog, description, **kwargs):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (for `vllm serve`, the web demo, torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fail(prog: str, message) -> None:
    """Stop the command with one line on stderr, exit status 1."""
    sys.exit(f"{prog}: error: {message}")


def positive(text: str, number: type, what: str):
    """`text` as a `number` above 0, or an argparse error saying it must be `what`."""
    try:
        value = number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return positive(text, int, "an integer >= 1")


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    return positive(text, float, "a number > 0")


def torch_device(text: str) -> str:
    """An argparse type: a torch device this machine has (`cpu`, `cuda`, `cuda:1`, `mps`, ...)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU (torch {torch.__version__}); "
                                             "use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    return text


def load_dtype(folder, device: str):
    """The dtype the commands load `folder` in: fp32 on a CPU (fast everywhere, exact), the folder's own elsewhere;
    for a folder of quantized weights (`omnilmm-quantize`'s), its loader's choice for the rest (bf16 where the device
    computes it natively, else fp32)."""
    import json
    from pathlib import Path

    import torch

    config = json.loads((Path(folder) / "config.json").read_text())
    return torch.float32 if device == "cpu" and not config.get("quanto_weights") else "auto"
