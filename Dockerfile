# tgis container image: UBI 9, multi-stage (build a wheel, then a slim runtime with a non-root user).
# Build: make build   Run: docker run --gpus all -p 8033:8033 -p 3000:3000 -v hf-cache:/data tgis:latest --model-name <id>
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
RUN microdnf install -y python${PYTHON_VERSION} python${PYTHON_VERSION}-pip shadow-utils && microdnf clean all \
    && useradd --uid 2000 --create-home --shell /sbin/nologin tgis
COPY --from=build /wheels /wheels
# torch is left unpinned by the package: the default index serves the CUDA build expected in this image
# the guided extra (xgrammar) adds little here: its triton dependency comes with the CUDA torch anyway
RUN python${PYTHON_VERSION} -m pip install --no-cache-dir "$(echo /wheels/*.whl)[guided]" && rm -rf /wheels
ENV HF_HUB_CACHE=/data \
    HF_HUB_OFFLINE=1 \
    TGIS_CACHE=/data/tgis \
    PYTHONUNBUFFERED=1 \
    GRPC_PORT=8033 \
    PORT=3000
RUN mkdir -p /data && chown tgis /data
VOLUME /data
USER tgis
EXPOSE 8033 3000
ENTRYPOINT ["tgis", "serve"]
