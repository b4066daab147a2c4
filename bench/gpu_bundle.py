"""The wheels a lent GPU machine lacks, made here, where PyPI is reachable.

The lent machines (the device tool) hold Python 3.12 with torch 2.11 (cu130), torchvision 0.26, numpy, tensorboard
and pyyaml, reach no index, and take what travels with the working tree: 64 MiB in all. This writes the cp312
manylinux wheels of everything else the trainer and the benches import (requirements.txt's pins) into OUT
(default gpu_bundle/, git-ignored), leaving out what the machine has and what cannot travel, each said in one line:

* torch, torchvision, numpy, tensorboard, pyyaml and everything they pull in: the machine's own (its torch 2.11
  stands in for the pinned 2.14.1; cid_ds uses nothing newer than 2.4's fused CPU AdamW and torch.compile);
* nvidia-dali-cuda130 (476 MB): the GPU check runs the PIL loader instead;
* faiss-gpu: PyPI's faiss-gpu-cu12 is 48 MB and needs CUDA 12's cuBLAS and runtime wheels beside the machine's
  CUDA 13 torch: faiss-cpu (19 MB) travels instead.

DeepSpeed publishes only a source archive; it is built here into a pure-Python wheel (its ops compile at run time).
The bundle's size plus the working tree's must fit the 64 MiB; OUT/contents.txt lists every wheel and its size.

    python bench/gpu_bundle.py [--out gpu_bundle]
then, on the lent machine (bench/gpu_check.sh does it first):
    python -m pip install --no-index --find-links gpu_bundle -r gpu_bundle/requirements.txt
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY_LIMIT = 64 * 2**20  # the device tool's: the working tree and what `carry` names, together
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:",
            *[arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
              for arg in ("--platform", tag)]]
ON_THE_MACHINE = ["numpy", "tensorboard", "pyyaml"]
# Stood in for by wheels without dependencies: PyPI's torch 2.11 asks for CUDA 13 wheels that PyPI only names
STAND_INS = {"torch": "2.11.0", "torchvision": "0.26.0"}
CANNOT_TRAVEL = {
    "nvidia-dali-cuda130": "476 MB: the GPU check runs the PIL loader (data.backend=wds) instead",
    "faiss-gpu": "faiss-gpu-cu12 needs CUDA 12's runtime and cuBLAS wheels beside the machine's CUDA 13 torch: "
                 "faiss-cpu travels instead",
}
TEST_ONLY = {"pytest", "pytest-timeout"}  # the GPU check runs benches, not the suite


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements() -> list[str]:
    """requirements.txt's lines for what the trainer and benches import, less what the machine has, what cannot
    travel and what only the tests use."""
    kept = []
    for line in open(os.path.join(REPO, "requirements.txt")):
        line = line.split("#")[0].strip()
        name = normalized(re.split(r"[<>=!~ ]", line)[0]) if line else ""
        if name and name not in {*STAND_INS, *ON_THE_MACHINE, *CANNOT_TRAVEL, *TEST_ONLY}:
            kept.append(line)
    return kept


def pip(*args: str) -> None:
    # the dev machines' pip constraints cap torch for Python 3.11; they do not apply to another interpreter's wheels
    env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def resolved(requirements: list[str], find_links: list[str]) -> dict[str, str]:
    """name -> version of everything ``requirements`` install for cp312 manylinux (metadata only: nothing is
    downloaded but what PyPI cannot describe without the wheel)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "report.json")
        pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", report, "--target", scratch,
            *find_links, *PLATFORM, *requirements)
        with open(report) as f:
            return {normalized(item["metadata"]["name"]): item["metadata"]["version"] for item in json.load(f)["install"]}


def stand_in_wheel(name: str, version: str, folder: str) -> str:
    """A wheel of ``name`` at ``version`` with no files and no dependencies (local version ``+machine``, which no
    index has): it makes the resolver take the machine's package as installed. Returns the requirement."""
    version = f"{version}+machine"
    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(os.path.join(folder, f"{name}-{version}-py3-none-any.whl"), "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
    return f"{name}=={version}"


def deepspeed_wheel(requirement: str, folder: str) -> None:
    """DeepSpeed's source archive built into a pure-Python wheel (no ops prebuilt: they compile where they run)."""
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", folder, requirement)


def working_tree_bytes() -> int:
    """What travels anyway: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(REPO, n)) for n in names if n and os.path.isfile(os.path.join(REPO, n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "gpu_bundle"))
    args = parser.parse_args()
    for name, why in CANNOT_TRAVEL.items():
        print(f"left out: {name}: {why}")
    print(f"left out: {', '.join([*STAND_INS, *ON_THE_MACHINE])} and what they pull in: the machine's own")
    requirements = pinned_requirements()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    deepspeed = next(r for r in requirements if normalized(r).startswith("deepspeed"))
    deepspeed_wheel(deepspeed, args.out)
    with tempfile.TemporaryDirectory() as stand_ins:
        on_the_machine = ON_THE_MACHINE + [stand_in_wheel(n, v, stand_ins) for n, v in STAND_INS.items()]
        links = ["--find-links", args.out, "--find-links", stand_ins]
        machine = resolved(on_the_machine, links)
        needed = {name: version for name, version in resolved(requirements + on_the_machine, links).items()
                  if name not in machine}
    pip("download", "--quiet", "--no-deps", "--dest", args.out, "--find-links", args.out, *PLATFORM,
        *[f"{name}=={version}" for name, version in sorted(needed.items()) if name != "deepspeed"])
    with open(os.path.join(args.out, "requirements.txt"), "w") as f:  # what to install; the rest comes as their deps
        f.write("".join(f"{line}\n" for line in requirements))
    wheels = sorted(n for n in os.listdir(args.out) if n.endswith(".whl"))
    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in wheels}
    total, tree = sum(sizes.values()), working_tree_bytes()
    lines = [f"{size / 2**20:7.2f} MiB  {name}" for name, size in sizes.items()]
    lines.append(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels; with the working tree's {tree / 2**20:.2f} MiB: "
                 f"{(total + tree) / 2**20:.2f} of the {CARRY_LIMIT / 2**20:.0f} MiB that travel")
    with open(os.path.join(args.out, "contents.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if total + tree > CARRY_LIMIT:
        sys.exit(f"gpu_bundle: {(total + tree) / 2**20:.2f} MiB is more than the {CARRY_LIMIT / 2**20:.0f} MiB "
                 "that travel to the lent machine")


if __name__ == "__main__":
    main()
