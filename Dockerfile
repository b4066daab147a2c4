# cid_ds trainer image: docker build -t cid_ds .      (--build-arg FAISS=cpu: faiss without GPU support)
#     docker run --gpus all --shm-size 16g -p 6006:6006 -v /data:/data cid_ds ds_configs/experiments/x.yaml [k=v ...]
# Base: plain Python 3.11 (the version the pins in requirements.txt are tested with) rather than an
# nvidia/cuda image. The Linux torch wheel from requirements.txt is the CUDA build and brings the CUDA
# runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels, and nvidia-dali-cuda130 bundles its own, so a CUDA
# base would only add a second, possibly different, copy. Only the driver comes from the host (NVIDIA
# Container Toolkit, enabled by the NVIDIA_* variables below). No CUDA compiler: nothing is JIT-built on
# GPU (torch AdamW, no fused DeepSpeed ops, DS_BUILD_OPS=0).
FROM python:3.11-slim-bookworm

# Another wheel index for torch if needed, e.g. --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG PIP_EXTRA_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# g++: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) compiles its small shared-memory comm op on the
# first launch. pdsh + ssh: launch/multi_node.sh's default (ssh) multi-node start. tini: PID 1 (below).
# libibverbs1 + ibverbs-providers: NCCL loads the verbs library (and the mlx5 provider) at run time for
# InfiniBand; without them it falls back to sockets between nodes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ openssh-client pdsh tini libibverbs1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 cid \
    && mkdir /opt/venv /app \
    && chown cid:cid /opt/venv /app
USER cid
WORKDIR /app

# The Makefile's install steps, requirements first so code edits do not re-install them.
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip setuptools
COPY --chown=cid:cid requirements.txt pyproject.toml ./
RUN pip install --no-cache-dir -r requirements.txt
# faiss's GPU build (k-means and the balance's searches on the GPUs) unless --build-arg FAISS=cpu, which keeps
# requirements.txt's faiss-cpu (the version stays the one pinned there).
ARG FAISS=gpu
COPY --chown=cid:cid launch/install_faiss_gpu.sh launch/
RUN case "$FAISS" in gpu) launch/install_faiss_gpu.sh ;; cpu) ;; \
        *) echo "--build-arg FAISS must be gpu or cpu, got '$FAISS'" >&2; exit 1 ;; esac
COPY --chown=cid:cid cid_ds cid_ds
COPY --chown=cid:cid data_tools data_tools
COPY --chown=cid:cid ds_configs ds_configs
COPY --chown=cid:cid launch launch
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

# TensorBoard: docker exec CONTAINER tensorboard --logdir runs --bind_all --port 6006
EXPOSE 6006
# tini is PID 1: it passes docker stop's SIGTERM to the entrypoint, whose launch (launch/supervise.py) makes
# every rank checkpoint and exit, and it reaps what the ranks leave. Give the ranks time to save:
# docker stop -t 300 (docker's default is 10 s, then SIGKILL).
ENTRYPOINT ["tini", "--", "launch/docker_entrypoint.sh"]
