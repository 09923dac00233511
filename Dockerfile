# Pruning Studio in a container: CPU by default.
#   docker build -t pruning-studio .
#   docker run --rm -p 8501:8501 -v studio-runs:/app/runs pruning-studio      # then open http://localhost:8501
# Your own checkpoints and data: mount them under /data (read-only is fine), e.g. -v "$PWD/models:/data/models:ro".
# GPU image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 and run with --gpus all.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    STUDIO_RUNS=/app/runs \
    STUDIO_CACHE=/app/runs/.cache \
    STUDIO_DATA_ROOTS=/app:/data

RUN groupadd --system --gid 1000 studio \
    && useradd --system --uid 1000 --gid studio --create-home --home-dir /home/studio studio

WORKDIR /app

# torch/torchvision from the CPU (or the chosen CUDA) wheel index first, so the pins below are already met.
COPY requirements.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==2.14.1" "torchvision==0.29.1" \
    && pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md app.py ./
COPY .streamlit ./.streamlit
COPY studio ./studio
COPY pages ./pages
COPY assets ./assets
RUN pip install --no-cache-dir --no-deps -e . \
    && mkdir -p /app/runs /data /tmp/numba-cache \
    && chown -R studio:studio /app/runs /data /tmp/numba-cache

USER 1000:1000
VOLUME ["/app/runs"]
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
# .streamlit/config.toml binds to 127.0.0.1; inside the container the port is published, so listen on all.
CMD ["streamlit", "run", "app.py", "--server.address", "0.0.0.0", "--server.port", "8501"]
