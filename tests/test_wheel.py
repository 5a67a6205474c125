"""`pip install .` as users install it (issue 16.3): the wheel, not this checkout.

The wheel is built from a copy of setup.py + megatron_tbrm/ and installed (--no-deps) into a
fresh venv whose only other path is this test venv's site-packages (the dependencies, added as
a plain path: the editable install's finder there is not run, so it cannot shadow the wheel).
Every console script runs from a folder outside the checkout; one real conversion goes
HF -> Megatron -> HF (TP=1: each process imports megatron-core, ~20 s on a loaded 2-core
machine; tests/test_convert.py covers TP x PP workers) and every tensor must come back
bit-identical.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["megatron-tbrm-train", "tbrm-train", "megatron-tbrm-eval", "megatron-tbrm-convert-hf-to-megatron",
           "megatron-tbrm-convert-megatron-to-hf", "megatron-tbrm-compare-runs", "megatron-tbrm-plan"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return dict(env, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _run(cmd: list, cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    shutil.copy2(REPO / "setup.py", src / "setup.py")
    shutil.copytree(REPO / "megatron_tbrm", src / "megatron_tbrm", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src], root)
    (wheel,) = (root / "dist").glob("megatron_tbrm-*.whl")

    env = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env], root)
    site = Path(_run([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     root).stdout.strip())
    (site / "test-venv-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the test venv's editable megatron-tbrm is visible through that path.
    _run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "-q", "--no-deps",
          "--no-index", "--ignore-installed", wheel], root)
    return env


def test_the_package_is_the_wheel(venv, tmp_path):
    out = _run([venv / "bin" / "python", "-c", "import megatron_tbrm.convert.launch as m; print(m.__file__)"],
               tmp_path).stdout.strip()
    assert Path(out).is_relative_to(venv) and not Path(out).is_relative_to(REPO), out
    # package data: the `mini` eval preset's problems ship in the wheel
    out = _run([venv / "bin" / "python", "-c", "from megatron_tbrm.benchmarks import MINI_MATH; "
                "print(MINI_MATH, MINI_MATH.is_file())"], tmp_path).stdout.split()
    assert Path(out[0]).is_relative_to(venv) and out[1] == "True", out


def test_every_console_script_runs(venv, tmp_path):
    """--help of each, all at once (each imports what its module imports: torch for train)."""
    procs = {script: subprocess.Popen([venv / "bin" / script, "--help"], cwd=tmp_path, env=_env(), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in SCRIPTS}
    for script, p in procs.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and "usage:" in out and "--help" in out, f"{script}: {err[-2000:]}"


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    return tensors


def test_round_trip_conversion_with_the_installed_scripts(venv, tmp_path, tiny_model_dir):
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf"
    _run([venv / "bin" / "megatron-tbrm-convert-hf-to-megatron", "--hf-dir", tiny_model_dir, "--out", ckpt], tmp_path)
    _run([venv / "bin" / "megatron-tbrm-convert-megatron-to-hf", "--ckpt", ckpt, "--out", back], tmp_path)
    source, result = read_all(tiny_model_dir), read_all(back)
    assert source and sorted(result) == sorted(source)
    for k, v in source.items():
        assert result[k].dtype == v.dtype and torch.equal(result[k], v), k
    # An input error is one line from the installed script, not a traceback.
    p = _run([venv / "bin" / "megatron-tbrm-convert-megatron-to-hf", "--ckpt", tmp_path, "--out", tmp_path / "x"],
             tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr
