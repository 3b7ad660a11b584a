# One image for every role: replicas, the unreplicated server, clients, benchmarks.
# Build: docker build -t bft-bfs .    Run a cluster: docker compose up
FROM python:3.11-slim

# FUSE 3 for the BFS mount (and pyfuse3's build), a compiler for pyfuse3 and the Andrew benchmark.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bft ./bft
COPY bfs ./bfs
COPY client ./client
COPY bench ./bench
RUN pip install --no-cache-dir '.[fuse]'

ENTRYPOINT ["bft"]
CMD ["--help"]
