# The FAAR gateway: faar_serve only (no torch, no training code), as a non-root user.
#
#   docker build -t faar-gateway .                                  # GPU runtime (default)
#   docker build --build-arg RUNTIME=cpu -t faar-gateway:cpu .      # CPU runtime, a far smaller image
#   docker run --rm --gpus all -p 8080:8080 -v "$PWD/model_repository:/models:ro" faar-gateway
#
# Dependencies come from pyproject.toml's metadata, nothing is listed here: the core, the
# [serve] extra and the [$RUNTIME] extra. RUNTIME=gpu is onnxruntime-gpu 1.26.0 (the last
# CUDA 12 build) with CUDA 12 and cuDNN 9 from NVIDIA's pip wheels, so the host needs only
# an NVIDIA driver R525 or newer (CUDA 12 minor-version compatibility) and the NVIDIA
# Container Toolkit (`--gpus all`). Without a visible GPU the embedded engine runs on the CPU
# (device=auto) and says so in its log. RUNTIME=cpu is plain onnxruntime: enough for
# FAAR_ENGINE=triton (compose.yaml, deploy/k8s), where the gateway only forwards to Triton.
# Every setting is a FAAR_* variable (faar-serve --help).
FROM python:3.11-slim

ARG RUNTIME=gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FAAR_MODEL_REPOSITORY=/models \
    FAAR_HOST=0.0.0.0 \
    FAAR_PORT=8080

RUN useradd --create-home --uid 10001 faar

WORKDIR /src
# 1. The dependencies alone, from the metadata: with no package folder copied yet '.' is a
#    project without modules whose requirements are those of the gateway. This layer (the
#    GPU runtime is gigabytes) is rebuilt only when pyproject.toml changes, not with the code.
COPY pyproject.toml README.md /src/
RUN pip install "/src[serve,${RUNTIME}]"
# 2. The gateway package itself (faar_serve only: the training package is not in the context).
COPY faar_serve/ /src/faar_serve/
RUN pip install --no-deps /src && rm -rf /src

WORKDIR /home/faar
USER faar
EXPOSE 8080

# Liveness only: /readyz (engine answering) is for load balancers, so a Triton restart
# does not get the gateway container killed as well.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['FAAR_PORT'] + '/healthz', timeout=2)"]

CMD ["python", "-m", "faar_serve"]
