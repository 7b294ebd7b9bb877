# tgis container image: UBI 9, multi-stage (build a wheel, then a slim runtime with a non-root user).
# Build: make build   Run: docker run --gpus all -p 8033:8033 -p 3000:3000 -v hf-cache:/data tgis:latest --model-name <id>
# Kubernetes / OpenShift: make deploy OVERLAY=smollm2 (deployment/; tests/test_deployment.py keeps the two in step)
ARG PYTHON_VERSION=3.11

FROM registry.access.redhat.com/ubi9/ubi-minimal:latest AS build
ARG PYTHON_VERSION
RUN microdnf install -y python${PYTHON_VERSION} python${PYTHON_VERSION}-pip && microdnf clean all
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tgis_cli tgis_cli
COPY commands commands
COPY runtime runtime
COPY proto proto
RUN python${PYTHON_VERSION} -m pip wheel --no-deps -w /wheels .

FROM registry.access.redhat.com/ubi9/ubi-minimal:latest AS runtime
ARG PYTHON_VERSION
# uid 2000 in group 0: Kubernetes runs it as is; OpenShift runs an arbitrary uid in group 0, so what the server
# writes (home, /data) belongs to group 0 with the owner's rights
RUN microdnf install -y python${PYTHON_VERSION} python${PYTHON_VERSION}-pip shadow-utils && microdnf clean all \
    && useradd --uid 2000 --gid 0 --home-dir /home/tgis --create-home --shell /sbin/nologin tgis \
    && mkdir -p /data && chown 2000:0 /data /home/tgis && chmod g=u /data /home/tgis
COPY --from=build /wheels /wheels
# torch is left unpinned by the package: the default index serves the CUDA build expected in this image
# the guided extra (xgrammar) adds little here: its triton dependency comes with the CUDA torch anyway; deepspeed
# (tensor parallelism for architectures without our own split rules) builds from its sdist, without compiled ops
RUN DS_BUILD_OPS=0 python${PYTHON_VERSION} -m pip install --no-cache-dir "$(echo /wheels/*.whl)[guided,deepspeed]" \
    && rm -rf /wheels
ENV HOME=/home/tgis \
    HF_HUB_CACHE=/data \
    HF_HUB_OFFLINE=1 \
    TGIS_CACHE=/data/tgis \
    PYTHONUNBUFFERED=1 \
    GRPC_PORT=8033 \
    PORT=3000
VOLUME /data
# numeric, so that kubelet can check runAsNonRoot
USER 2000
EXPOSE 8033 3000
ENTRYPOINT ["tgis", "serve"]
