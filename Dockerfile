# One image for every role: replicas, the unreplicated server, clients (with the BFS mount).
#   docker build -t bft-bfs .
#   docker build -t bft-bfs --build-arg BASE_IMAGE=bft-base:bookworm .   (no registry: deploy/docker-base.sh)
# Both stages start from BASE_IMAGE, a Debian with Python 3.11 (python:3.11-slim or the local one).
ARG BASE_IMAGE=python:3.11-slim

# -- build: a compiler and FUSE's headers for pyfuse3, then the project's wheels in a venv ---------
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/bft
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bft ./bft
COPY bfs ./bfs
COPY client ./client
COPY bench ./bench
RUN /opt/bft/bin/pip install --no-cache-dir --disable-pip-version-check '.[fuse]'

# -- run: the venv, FUSE 3's runtime (fusermount3), and a user for replicas -----------------------
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/bft /opt/bft
ENV PATH=/opt/bft/bin:$PATH PYTHONUNBUFFERED=1
# Replicas run as bft (uid 10001); their data volume is created from /data, so it is bft's too.
RUN groupadd --system --gid 10001 bft \
    && useradd --system --uid 10001 --gid bft --home-dir /data --shell /usr/sbin/nologin bft \
    && mkdir -p /data /mnt/bfs && chown bft:bft /data
USER bft
WORKDIR /data
# Healthy once this replica's admin port answers /status (BFT_CONFIG and BFT_ID name it; a
# container of another role sets its own healthcheck or none).
ENV BFT_CONFIG=/cluster/cluster.toml
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 \
    CMD bft status --config "$BFT_CONFIG" --id "$BFT_ID" --timeout 3 >/dev/null || exit 1
ENTRYPOINT ["bft"]
CMD ["--help"]
