# One image for every vla-rl service: `vla-rl serve env|rollout|learner [flags]`.
#   CPU (laptops, CI, the tiny default):  docker build -t vla-rl:cpu .
#   GPU nodes (CUDA 12.8 runtime):        docker build -t vla-rl:gpu --build-arg VARIANT=gpu .
# The vLLM engine is not installed: its wheels pin an exact torch; the torch engine serves.
# Model weights are never baked in: mount a checkpoint directory read-only (/models).

ARG VARIANT=cpu

# ---- dependencies, built once per requirement change --------------------------------------
FROM python:3.11-slim-bookworm AS deps-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS deps-gpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM deps-${VARIANT} AS builder
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/base.txt requirements/core.txt requirements/sim.txt requirements/
RUN pip install --extra-index-url "$TORCH_INDEX" -r requirements/base.txt \
    && pip install -r requirements/core.txt -r requirements/sim.txt
COPY pyproject.toml README.md ./
COPY vla_rl vla_rl
COPY services services
COPY protos protos
COPY examples examples
COPY deploy deploy
RUN pip install --no-deps .

# ---- runtime --------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM deps-${VARIANT} AS runtime
# ManiSkill renders through Vulkan: Mesa's lavapipe on CPU nodes; on GPU nodes the NVIDIA
# container toolkit mounts the driver's ICD (NVIDIA_DRIVER_CAPABILITIES below).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvulkan1 mesa-vulkan-drivers libgl1 \
        libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 vla \
    && mkdir -p /runs && chown 10001:10001 /runs
# /runs exists and is the service user's: a named volume first mounted there copies this
# directory's owner, where a path missing from the image would come up root's, unwritable.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src /opt/vla-rl
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/opt/vla-rl \
    NVIDIA_DRIVER_CAPABILITIES=all \
    VLA_RL_HEALTH_TARGET=127.0.0.1:50051
WORKDIR /opt/vla-rl
USER 10001
# gRPC (env 50051, rollout 50052, learner 50053) and Prometheus metrics (9100).
EXPOSE 50051 50052 50053 9100
HEALTHCHECK --interval=15s --timeout=10s --start-period=10m --retries=3 \
    CMD ["vla-rl", "health", "--timeout", "8"]
ENTRYPOINT ["vla-rl"]
CMD ["serve", "env", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100"]
