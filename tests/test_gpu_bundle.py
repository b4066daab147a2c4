"""What bench/gpu_bundle.py sends to a lent GPU machine: the trainer's pinned packages and nothing the machine holds
or the wheels cannot carry; the machine's torch stood in for by a wheel that pip resolves offline."""
import subprocess
import sys

from bench.gpu_bundle import CANNOT_TRAVEL, ON_THE_MACHINE, STAND_INS, pinned_requirements, stand_in_wheel


def test_the_bundle_asks_for_the_trainers_pins_and_nothing_the_machine_has_or_cannot_carry():
    wanted = pinned_requirements()
    names = {line.split("=")[0].split(">")[0].split("<")[0] for line in wanted}
    assert {"deepspeed==0.19.8", "open_clip_torch==3.3.0", "webdataset==1.0.2", "faiss-cpu==1.15.1"} <= set(wanted)
    assert not names & {*STAND_INS, *ON_THE_MACHINE, *CANNOT_TRAVEL, "pytest"}


def test_a_stand_in_for_the_machines_torch_satisfies_a_requirement_on_torch_offline(tmp_path):
    requirement = stand_in_wheel("torch", "2.11.0", str(tmp_path))
    assert requirement == "torch==2.11.0+machine"
    resolved = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--ignore-installed",
                               "--find-links", str(tmp_path), "--target", str(tmp_path / "t"), "torch>=2.4"],
                              capture_output=True, text=True, env={"PIP_CONSTRAINT": "", "PATH": "/usr/bin:/bin"})
    assert resolved.returncode == 0, resolved.stderr
    assert "torch-2.11.0+machine" in resolved.stdout
