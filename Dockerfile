# The FAAR gateway: faar_serve only (no torch, no training code), as a non-root user.
#
#   docker build -t faar-gateway .
#   docker run --rm --gpus all -p 8080:8080 -v "$PWD/model_repository:/models:ro" faar-gateway
#
# ONNX Runtime's GPU build with CUDA and cuDNN from NVIDIA's wheels: the embedded engine
# runs on the GPU when the container sees one (--gpus), on the CPU otherwise. With
# FAAR_ENGINE=triton (compose.yaml) the gateway only forwards to Triton. Every setting is a
# FAAR_* variable (faar-serve --help).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FAAR_MODEL_REPOSITORY=/models \
    FAAR_HOST=0.0.0.0 \
    FAAR_PORT=8080

# The gateway's own dependencies (the [serve] extra without the local Triton server wheel).
RUN pip install "numpy<2" pillow fastapi "uvicorn[standard]" python-multipart pydantic-settings \
        prometheus-client "tritonclient[grpc,http]" "onnxruntime-gpu[cuda,cudnn]" \
        "opencv-python-headless<4.12" zlib-ng fpng tqdm \
    && useradd --create-home --uid 10001 faar

WORKDIR /app
COPY faar_serve/ /app/faar_serve/
USER faar
EXPOSE 8080

# Liveness only: /readyz (engine answering) is for load balancers, so a Triton restart
# does not get the gateway container killed as well.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['FAAR_PORT'] + '/healthz', timeout=2)"]

CMD ["python", "-m", "faar_serve"]
