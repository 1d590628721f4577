"""The package as a package index serves it: built as a wheel, installed (not editable) into a fresh virtual
environment, and run outside the checkout. The wheel's dependencies are this environment's (a `.pth` file puts its
site-packages on the new environment's path), so that the test installs nothing from the network."""

import random
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT
from omnilmm_tools import shapes
from omnilmm_tools.remote import REMOTE_CODE_FILES

HUB_FILES = ("tokenizer_config.json", "demo_model/config.json", "demo_model/model.safetensors",
             "demo_model/README.md", "assets/sample.png", "assets/sample.mp4", *REMOTE_CODE_FILES,
             *(f"demo_model/{name}" for name in REMOTE_CODE_FILES))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(dist), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return next(dist.glob("omnilmm_hf-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed; returns its bin/ folder."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "env")], check=True)
    python = home / "env" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                             str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return home / "env" / "bin"


def run(command, cwd):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_the_wheel_carries_the_hub_files_once_each(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in HUB_FILES if f"omnilmm_tools/hub/{name}" not in names]
    assert not missing, missing
    # the demo model's remote code is the root's (links in the repository, real files in the wheel)
    with zipfile.ZipFile(wheel) as archive:
        for name in REMOTE_CODE_FILES:
            assert archive.read(f"omnilmm_tools/hub/demo_model/{name}") == (ROOT / name).read_bytes()
    assert not [name for name in names if name.startswith(("tests/", "omnilmm_tools/hub/tests", ".venv"))]


def test_the_installed_commands_answer_and_convert_outside_the_checkout(venv, tmp_path):
    # one shape of a known colour, drawn by the task generator (a seed no training run used)
    rng = random.Random(77)
    scene = shapes.random_scene(rng, 1)
    shapes.draw(scene, rng).save(tmp_path / "shape.png")
    located = run([venv / "python", "-c", "import omnilmm_tools.remote as r; print(r.ROOT)"], tmp_path)
    assert str(ROOT) not in located.stdout and "site-packages" in located.stdout, located
    chat = run([venv / "omnilmm-chat", "--image", tmp_path / "shape.png", "What colour is the shape?"], tmp_path)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == scene[0].colour, (chat.stdout, scene)

    converted = run([venv / "omnilmm-convert", FIXTURES / "omnilmm-tiny-original" / "original", tmp_path / "hub"],
                    tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert {name for name in REMOTE_CODE_FILES} <= {path.name for path in (tmp_path / "hub").iterdir()}


@pytest.mark.parametrize("arguments, message", [
    (["--device", "cuda"], "this machine has no CUDA GPU"),
    (["--max-slice-nums", "0"], "--max-slice-nums: must be an integer >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, got 0"),
    (["--image", "missing.png"], "no image file at missing.png"),
    (["--model", "."], ". is not a model folder"),
])
def test_chat_command_errors_are_one_line(venv, tmp_path, arguments, message):
    result = run([venv / "omnilmm-chat", *arguments, "What colour is the shape?"], tmp_path)
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith("omnilmm-chat: error: ") and message in result.stderr, result.stderr


def test_convert_command_errors_are_one_line(venv, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    original = FIXTURES / "omnilmm-tiny-original" / "original"
    for arguments, message in [([tmp_path / "missing", tmp_path / "new"], "missing is not a folder"),
                               ([original, tmp_path / "taken"], "exists and is not empty"),
                               ([original, tmp_path / "new", "--tokenizer", tmp_path / "none"], "no SentencePiece")]:
        result = run([venv / "omnilmm-convert", *arguments], tmp_path)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result
        assert result.stderr.startswith("omnilmm-convert: error: ") and message in result.stderr, result.stderr
    assert (tmp_path / "taken" / "file").exists() and not (tmp_path / "new").exists()


def test_help_texts_name_each_default_once_and_no_missing_file(venv, tmp_path):
    for command in ("omnilmm-chat", "omnilmm-convert", "omnilmm-finetune", "omnilmm-eval-shapes", "omnilmm-bench",
                    "omnilmm-demo"):
        text = run([venv / command, "--help"], tmp_path).stdout
        assert text.startswith("usage: "), (command, text)
        flat = " ".join(text.split())
        assert "SPEC" not in flat and "configs/" not in flat, (command, text)
        for option in flat.split(" --")[1:]:
            assert option.count("default") <= 1, (command, option)

