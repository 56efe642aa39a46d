# GPU training image; everything after the image name goes to src/train.py:
#   docker run --gpus all --shm-size=8g -v /path/to/basketball-jersey-numbers-ocr:/data:ro \
#       -v "$PWD/runs:/app/runs" IMAGE --recipe recipes/basketball_r18.yaml --data.root /data
# (the runs folder must be writable by uid 10001; see docs/GCP.md)
# CLASSIFIER_TRAINING_REQUIRE_GPU=1 makes train.require_gpu default to true in the image: without a
# usable GPU (e.g. a host driver too old for CUDA 13) training stops with the reason instead of
# silently running on the CPU; --train.require_gpu false overrides it.
#
# Base image. The pinned torch (requirements.lock) is the default PyPI Linux wheel, built for
# CUDA 13.0, and it brings its own CUDA 13 user-space libraries as nvidia-* wheels (cuBLAS,
# cuDNN 9, NCCL, ...). A cudnn-runtime base would install a second copy of those (~3 GB) that
# torch never loads, so we take NVIDIA's small "base" flavour of the same CUDA release: it carries
# the NVIDIA Container Toolkit variables (NVIDIA_VISIBLE_DEVICES, NVIDIA_REQUIRE_CUDA, ...) and the
# cuda-compat forward-compatibility libraries, which the toolkit enables on data-center GPUs
# (a T4 is one) when the host driver is older than the container's CUDA.
# Driver: CUDA 13.x needs an NVIDIA driver of the R580 branch or newer (NVIDIA's CUDA
# compatibility guide: R535/R570 stop at CUDA 12.x); the T4 (sm_75) is in the wheel's arch list.
# The reference's nvidia/cuda:12.x base does not match this wheel.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="classifier-training" \
      org.opencontainers.image.description="Image classifier training (timm + Accelerate) with a verified ONNX bundle" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg \
    CLASSIFIER_TRAINING_REQUIRE_GPU=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (the project's version; Ubuntu 24.04 ships 3.12) from the deadsnakes PPA.
# Versions are not pinned: a PPA keeps only its newest build, so a pin would break the build
# the day it is superseded. software-properties-common is only needed to add the PPA.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini \
    && apt-get purge -y --auto-remove software-properties-common \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "${VIRTUAL_ENV}"

# Runtime user; uid 1000 is taken by Ubuntu's default "ubuntu" user.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --create-home --shell /bin/bash app

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when requirements.lock changes, and
# Cloud Build reuses it from the previous image (--cache-from). The run-time lock only: test and
# lint tools (requirements-dev.lock) stay out of the image.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# The project itself (no dependency resolution: the lock above is the environment). This installs
# the classifier_training package and the classifier-export/-predict/-evaluate console scripts;
# src/train.py stays a script (the entrypoint below runs it by path).
COPY . .
RUN pip install --no-deps . \
    && rm -rf build src/*.egg-info \
    && mkdir -p /app/runs /app/data \
    && chown app:app /app/runs /app/data

# Numeric, so runtimes that enforce runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# No secrets are baked in: pass WANDB_API_KEY (and --logging.wandb true) at run time, e.g.
# `docker run -e WANDB_API_KEY ...`. Outputs go to /app/runs/<recipe name> unless
# --train.output_dir says otherwise; mount a volume there to keep them.
#
# Signals (docker stop, a GCE or Vertex AI preemption): tini is PID 1 and, with -g, sends SIGTERM
# and SIGINT to the whole process group of its child. That child is `accelerate launch`, exec'd
# with both signals ignored (an ignored disposition survives exec): a one-process launcher
# forwards nothing and would otherwise die at once, taking the container down before the trainer
# could save. The trainer installs its own handlers, finishes the batch, writes a checkpoint and
# exits 75 (see README, "Preemption and resume"); with several GPUs torch's elastic agent installs
# its own handlers and forwards the signal to each trainer. Allow it time: `docker stop -t 60`.
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "bash", "-c", "trap '' TERM INT; exec accelerate launch src/train.py \"$@\"", "accelerate"]
