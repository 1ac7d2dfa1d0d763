# One image for the api, worker and migrate services of docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AUTOPRUNE_DATA_DIR=/data AUTOPRUNE_ARTEFACT_DIR=/data/artefacts
WORKDIR /app

# torch first, the CPU build from PyTorch's own index, pinned like everything else (constraints.txt)
COPY constraints.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY autoprune ./autoprune
COPY agents ./agents
COPY service ./service
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt . \
    && useradd --create-home --uid 1000 autoprune && mkdir -p /data && chown autoprune /data
USER autoprune
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["autoprune"]
CMD ["serve", "--host", "0.0.0.0"]
