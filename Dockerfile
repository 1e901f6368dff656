# kiln serving a mounted model directory.
#   GPU: docker build -t kiln .
#        docker run --gpus all -p 8000:8000 -v /path/to/model:/model:ro kiln
#   CPU: docker build -t kiln-cpu --build-arg VARIANT=cpu --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> .
# Arguments after the image name go to `kiln serve` (e.g. --max-num-seqs 64 --api-key KEY).
ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

FROM base-${VARIANT}
# empty: torch from the default index (a CUDA build on x86_64); set it for a CPU-only wheel
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/kiln
ENV PATH=/opt/kiln/bin:$PATH
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch>=2.4"
COPY pyproject.toml README.md /opt/kiln-src/
COPY src /opt/kiln-src/src
RUN pip install /opt/kiln-src && rm -rf /opt/kiln-src
COPY --chmod=755 deploy/entrypoint.sh /usr/local/bin/kiln-entrypoint

RUN useradd --create-home --uid 1000 kiln
USER kiln
WORKDIR /home/kiln
ENV KILN_MODEL=/model KILN_HOST=0.0.0.0 KILN_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${KILN_PORT}/health" || exit 1
ENTRYPOINT ["kiln-entrypoint"]
