"""Small real datasets and feature caches shared by the end-to-end tests."""
import contextlib
import os
import socket
import subprocess
import sys
import threading
from typing import Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def listening_addresses(root_pid: int) -> Iterator[set[tuple[str, int]]]:
    """The (address, port) pairs that ``root_pid`` or any process under it listens on (TCP), sampled in the
    background while the block runs."""
    import psutil
    seen: set[tuple[str, int]] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(root_pid)
                pids = {root.pid} | {child.pid for child in root.children(recursive=True)}
                seen.update((c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                            if c.pid in pids and c.status == psutil.CONN_LISTEN)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()


def one_rank_env() -> dict:
    """The environment of one CPU DeepSpeed rank started without the launcher, with the repository importable."""
    return dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", PYTHONPATH=REPO_ROOT)


def make_data_and_features(root: str, train_samples: int = 384, shards: int = 4) -> dict:
    """Demo data (tiny) and a feature cache from the random-init demo teacher."""
    from cid_ds.config import expand_shards
    from data_tools.extract import ExtractOptions, extract
    from data_tools.make_demo_data import generate
    data = os.path.join(root, "data")
    generate(data, train_samples=train_samples, shards=shards, seed=0, eval_scale=0.1)
    feats = os.path.join(root, "feats")
    extract(ExtractOptions(shards=expand_shards(os.path.join(data, "train", "*.tar")), teacher="demo-teacher",
                           out=feats, batch_size=64, workers=1, random_teacher_ok=True, device="cpu"))
    return {"data": data, "feats": feats, "shards": os.path.join(data, "train", "*.tar"),
            "eval": [os.path.join(data, "eval", s) for s in ("shapes", "colored_shapes", "retrieval")]}


def deepspeed_cmd(ranks: int) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(29700 + os.getpid() % 200), os.path.join(REPO_ROOT, "launch", "train.py")]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def write_shard_tar(path, first: int, count: int, corrupt=(), empty_caption=()) -> str:
    """An img2dataset-style shard of small drawn JPEGs; keys are global sample numbers. Keys in
    ``corrupt`` get a truncated JPEG, keys in ``empty_caption`` a blank caption."""
    import io
    import json

    import webdataset as wds
    from PIL import Image, ImageDraw
    with wds.TarWriter(str(path)) as tar:
        for i in range(first, first + count):
            key = f"{i:09d}"
            image = Image.new("RGB", (48, 40), (i * 37 % 256, i * 91 % 256, i * 53 % 256))
            ImageDraw.Draw(image).ellipse([i % 20, 4, 20 + i % 28, 36], fill=(255 - i % 256, 40, 200))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=90)
            jpg = buf.getvalue()
            tar.write({"__key__": key, "jpg": jpg[:len(jpg) // 2] if key in corrupt else jpg,
                       "txt": b"  " if key in empty_caption else f"a drawing, number {i}".encode(),
                       "json": json.dumps({"key": key}).encode()})
    return str(path)
