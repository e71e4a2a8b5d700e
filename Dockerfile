# The training image: CUDA, torch, sftkit with its extras, and the repository's configs/.
#
#   docker build -t REGISTRY/sftkit:0.1.0 .
#   docker push REGISTRY/sftkit:0.1.0
#   sftkit k8s render ... --image REGISTRY/sftkit:0.1.0 | kubectl apply -f -
#
# Every pod of a rendered job runs `sftkit launch` (the job sets the command), which starts
# `accelerate launch -m sftkit` with the flags its node needs. The base image brings CUDA, cuDNN,
# NCCL and torch; the -devel variant also brings nvcc and the CUDA headers DeepSpeed builds its ops
# with on first use. Another torch or CUDA: --build-arg BASE_IMAGE=pytorch/pytorch:<tag>.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel
FROM ${BASE_IMAGE}

# DeepSpeed compiles its ops (communication, CPU Adam) with g++ and ninja the first time a run needs them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The working directory holds configs/, so that paths such as configs/deepspeed/zero2.json in a
# recipe mean the same in a pod as in a checkout. Relative output_dir paths would land here, inside
# the container: sftkit k8s render asks for an output_dir on a mounted volume instead.
WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY sftkit ./sftkit
COPY configs ./configs
# torch is already in the base image and satisfies sftkit's requirement, so pip keeps that CUDA build.
RUN pip install ".[peft,k8s,plot,trackers]" && sftkit adapters

CMD ["sftkit", "--help"]
