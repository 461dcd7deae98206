# The image the Helm chart runs (server, pipeline CronJobs): CPU torch, Spark (Java 17), the `cascade` CLI,
# the repository at /opt/cascade (the jobs read their YAML configs from it).
#
#   docker build -t registry.example.com/cascade:0.1.0 .
#
# CUDA variant (the PyTorchJobs' image with pipeline.torchrun.operator.gpusPerNode): the CUDA builds of torch
# and fbgemm-gpu from PyTorch's index instead of the CPU shim (requirements-gpu.txt); the wheels carry the
# CUDA runtime, the nodes need only the NVIDIA driver and device plugin:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t registry.example.com/cascade-cuda:0.1.0 .
FROM python:3.11-slim-bookworm
ARG TORCH_INDEX_URL=""

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cascade
COPY . /opt/cascade
RUN python -m pip install --no-cache-dir -q pip==26.3 \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      python -m pip install --no-cache-dir -q --index-url "$TORCH_INDEX_URL" torch==2.13.0 fbgemm-gpu==1.8.0 \
   && python -m pip install --no-cache-dir -q -r requirements-gpu.txt; \
    else python -m pip install --no-cache-dir -q -r requirements.txt; fi \
 && python -m pip check

# Non-root, matching the chart's securityContext (runAsUser 10001, read-only root filesystem: writes go to
# the mounted artifacts volume and /tmp).
RUN useradd --uid 10001 --no-create-home --home-dir /tmp cascade
USER 10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 50051 9464
ENTRYPOINT ["cascade"]
CMD ["serve", "--config", "/etc/cascade/serving.yaml"]
