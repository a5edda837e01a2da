# fingerprint lab server (API) image; the same image runs the Dask scheduler and workers.
#   docker build -t fingerprint:local .
#   docker run -p 8000:8000 -v fingerprint-data:/data fingerprint:local
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FINGERPRINT_RECIPE_DIR=/opt/fingerprint/dictionaries \
    FINGERPRINT_DATA_DIR=/data \
    FINGERPRINT_DICTIONARY_DIR=/data/dictionaries \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/fingerprint

# project metadata first so the dependency layer is cached across source edits
COPY pyproject.toml README.md ./
COPY fingerprint ./fingerprint
COPY server ./server
COPY dictionaries ./dictionaries
RUN python -m pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin fingerprint \
    && mkdir -p /data/dictionaries \
    && chown -R fingerprint:fingerprint /data

USER fingerprint
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

CMD ["fingerprint", "serve", "--host", "0.0.0.0", "--port", "8000"]
