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

# 1. the dependencies only (an empty package with the project's metadata), so this layer
#    is reused as long as pyproject.toml does not change
COPY pyproject.toml README.md ./
RUN mkdir -p fingerprint server dictionaries \
    && touch fingerprint/__init__.py server/__init__.py dictionaries/placeholder.toml \
    && python -m pip install . \
    && python -m pip uninstall -y fingerprint-mri \
    && rm -rf fingerprint server dictionaries build *.egg-info

# 2. the project itself; the named-model recipes (dictionaries/*.toml) are installed with
#    it and FINGERPRINT_RECIPE_DIR points at this copy of them
COPY fingerprint ./fingerprint
COPY server ./server
COPY dictionaries ./dictionaries
RUN python -m pip install --no-deps . \
    && python -c "from fingerprint.models import available_models; assert available_models()" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin fingerprint \
    && mkdir -p /data/dictionaries \
    && chown -R fingerprint:fingerprint /data

USER fingerprint
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

CMD ["fingerprint", "serve", "--host", "0.0.0.0", "--port", "8000"]
