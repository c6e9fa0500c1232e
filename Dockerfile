# One image for the API and both kinds of worker (docker-compose.yml picks the command).
FROM python:3.11-slim

# llama-cpp-python builds from source: a C/C++ toolchain and cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

# CPU torch by default (a bare `torch` requirement would pull a multi-GB CUDA build);
# GPU training hosts build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md worker.py ./
COPY api ./api
COPY cli ./cli
COPY jobs ./jobs
COPY workflows ./workflows
COPY activities ./activities
COPY training ./training
COPY tenanttune ./tenanttune
COPY examples ./examples
RUN pip install --no-cache-dir .

# Production, explicitly (it is also the default): the API refuses to start without a
# JWT_SECRET of 32+ characters (or RS256 settings), and none is built into the image.
ENV PYTHONUNBUFFERED=1 \
    ENVIRONMENT=production \
    STATE_DIR=/srv/state \
    DATA_DIR=/srv/data \
    MODELS_DIR=/srv/models
EXPOSE 8000 9464
CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
