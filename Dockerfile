# GPU image, first version: kimi-rl on NVIDIA's PyTorch container (CUDA, NCCL, PyTorch and,
# on recent tags, flash-attn and Transformer Engine already built), with the `gpu`,
# `megatron` and `vllm` extras of pyproject.toml.
#   docker build -t kimi-rl .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/home/kimi/work/runs" kimi-rl train ...
# The base image is a build argument: --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<tag>
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/kimi-rl
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY curriculum ./curriculum
COPY kimi_rl ./kimi_rl
# the extras' version constraints live in pyproject.toml
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu,megatron,vllm]" \
    && groupadd --gid 10001 kimi \
    && useradd --create-home --shell /bin/bash --uid 10001 --gid 10001 kimi \
    && install -d -o 10001 -g 10001 /home/kimi/work
USER 10001:10001
WORKDIR /home/kimi/work
ENTRYPOINT ["kimi-rl"]
CMD ["--help"]
