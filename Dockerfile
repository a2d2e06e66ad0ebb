# Two targets from one file: `web` (the API, no ML libraries) and `worker` (the ML extras:
# sentence-transformers, llama-cpp-python, diffusers, and the demo models' pip packages).
# compose.yaml builds each service with its target. For CUDA offload in llama.cpp, build the
# worker with --build-arg LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" on a CUDA base image.
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

FROM web AS worker
ARG LLAMA_CMAKE_ARGS=""
# llama-cpp-python compiles llama.cpp on install.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir ".[ml,demo]"
CMD ["modelbay", "worker"]
