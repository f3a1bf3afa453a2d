# CPU image of `pyengine serve`, serving a checkpoint mounted at /models/model.pt:
#
#   docker build -t pyengine-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/lm:/models:ro" pyengine-serve
#
# Append another command line to serve something else, e.g.
#   ... pyengine-serve pyengine serve --model /models/clf.pt --host 0.0.0.0 --max-batch 32
# `docker stop` sends SIGTERM: the server drains its requests for up to --drain-timeout
# seconds (30), so give docker as long: `docker stop -t 35 ...`.
#
# CUDA variant (same file, two build arguments): PYTHON_IMAGE an NVIDIA CUDA "-devel" image
# to which Python 3.11 with pip (as `python` and `pip`) has been added, so nvcc compiles the
# CUDA kernels too, and TORCH_INDEX the torch wheel index of that CUDA version, e.g.
#   docker build -t pyengine-serve-cuda --build-arg PYTHON_IMAGE=my-cuda12.4-python3.11 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#   docker run --gpus all -p 8000:8000 -v "$PWD/runs/lm:/models:ro" pyengine-serve-cuda \
#       pyengine serve --model /models/model.pt --host 0.0.0.0 --device cuda

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: compile the C++ extension into a wheel ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The wheel carries baseline, AVX2 and AVX-512 kernels and picks on the host's CPU at run time,
# so the image runs on any x86-64 host at that host's best speed.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# torch first, from its CPU wheel index: the build compiles against it, and a plain
# `pip install torch` would pull a multi-GB CUDA build
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir setuptools wheel ninja pybind11
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels .

# ---- runtime: torch, the wheel and its dependencies, no compiler ----------------------------
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the extension links the system's OpenMP runtime
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN useradd --create-home --uid 10001 pyengine
USER pyengine
WORKDIR /home/pyengine
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["pyengine", "serve", "--model", "/models/model.pt", "--host", "0.0.0.0", "--port", "8000"]
