# syntax=docker/dockerfile:1
# Two targets from one file: `web` (the API, no ML libraries) and `worker` (the ML extras:
# sentence-transformers, llama-cpp-python, diffusers, and the demo models' pip packages).
# compose.yaml builds each service with its target. The worker comes in two flavours, chosen
# with the build argument WORKER_FLAVOR (BuildKit builds only the stages the flavour needs):
#
#   cpu (default): on python:3.11-slim; llama.cpp compiled for the CPU, torch from PyPI.
#     docker build --target worker -t modelbay-worker .
#   cuda: built on a CUDA *devel* image (nvcc and the CUDA headers, which ggml's CMake needs
#     for -DGGML_CUDA=on), run on the matching CUDA *runtime* image (libcudart, cuBLAS for
#     llama.cpp; the driver's libcuda comes from the NVIDIA container toolkit at run time);
#     llama.cpp's kernels compiled for CUDA_ARCHITECTURES, torch from the CUDA wheel index.
#     docker build --target worker --build-arg WORKER_FLAVOR=cuda -t modelbay-worker:cuda .
#     docker build --target worker --build-arg WORKER_FLAVOR=cuda --build-arg CUDA_ARCHITECTURES="90" \
#       --build-arg CUDA_VERSION=12.8.1 --build-arg TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128 .
#
# CUDA_ARCHITECTURES: 80 A100, 86 A10/RTX 30xx, 89 L4/L40S/RTX 40xx, 90 H100/H200; add 75 for
# T4, 70 for V100 (older GPUs run float16 or float32 in torch: docs/gpu.md). Every extra one
# lengthens the llama.cpp build. Blackwell (100, 120) needs CUDA 12.8 or later.
ARG WORKER_FLAVOR=cpu
ARG CUDA_VERSION=12.6.3
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9

FROM python:3.11-slim AS web
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY web ./web
COPY workers ./workers
RUN pip install --no-cache-dir ".[flower]"
ENV MODELBAY_MODELS_DIR=/models MODELBAY_RUN_DIR=/run/modelbay
EXPOSE 8080
CMD ["modelbay", "web", "--port", "8080"]

# -- the CPU worker (the default flavour) -----------------------------------------------------
FROM web AS worker-cpu
ARG LLAMA_CMAKE_ARGS=""
# llama-cpp-python compiles llama.cpp on install.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir ".[ml,demo]"
CMD ["modelbay", "worker"]

# -- the CUDA worker: build on the devel image ------------------------------------------------
FROM ${UV_IMAGE} AS uv

FROM ${CUDA_DEVEL_IMAGE} AS cuda-build
ARG CUDA_ARCHITECTURES="80;86;89;90"
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu126
ARG LLAMA_CMAKE_ARGS=""
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Python 3.11 from uv (a self-contained build), in /opt so the runtime stage can copy it.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN uv venv --python 3.11 /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY web ./web
COPY workers ./workers
# torch first, from the CUDA wheel index; the extras below then keep it.
RUN uv pip install --no-cache --index-url "${TORCH_CUDA_INDEX}" torch
# llama.cpp with its CUDA backend (ggml-cuda), for these GPU architectures only.
RUN CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} ${LLAMA_CMAKE_ARGS}" \
    uv pip install --no-cache ".[flower,ml,demo]"

# -- the CUDA worker: run on the runtime image ------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE} AS worker-cuda
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cuda-build /opt/python /opt/python
COPY --from=cuda-build /opt/venv /opt/venv
WORKDIR /app
# (The base image sets NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES for the toolkit.)
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    MODELBAY_MODELS_DIR=/models MODELBAY_RUN_DIR=/run/modelbay
CMD ["modelbay", "worker"]

# -- the worker target: the flavour asked for -------------------------------------------------
FROM worker-${WORKER_FLAVOR} AS worker
