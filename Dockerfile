# The image the Helm chart runs (server, pipeline CronJobs): CPU torch, Spark (Java 17), the `cascade` CLI,
# the repository at /opt/cascade (the jobs read their YAML configs from it). GPU images: replace the
# `pip install -r requirements.txt` line with `make install-gpu`'s two pip commands on a CUDA base image.
#
#   docker build -t registry.example.com/cascade:0.1.0 .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cascade
COPY . /opt/cascade
RUN python -m pip install --no-cache-dir -q pip==26.3 \
 && python -m pip install --no-cache-dir -q -r requirements.txt \
 && python -m pip check

# Non-root, matching the chart's securityContext (runAsUser 10001, read-only root filesystem: writes go to
# the mounted artifacts volume and /tmp).
RUN useradd --uid 10001 --no-create-home --home-dir /tmp cascade
USER 10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 50051 9464
ENTRYPOINT ["cascade"]
CMD ["serve", "--config", "/etc/cascade/serving.yaml"]
