import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The environment's tools first, for every process a test starts, as an activated environment has them (the launch
# scripts need its deepspeed anyway). DeepSpeed's CPU comm op is JIT-built with the first ninja on PATH, into one
# cache folder per machine: the pip ninja and a system ninja read each other's build log as stale, and every
# switch between them rebuilt the op (25 s on 2 cores; ten switches in one make test run).
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
