# `make demo` and `make test` set everything up themselves (a .venv from requirements.txt) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_BUILD_OPS ?= 0

.PHONY: setup setup-gpu demo demo-web slurm-demo ablate ablate-views ablate-captions ablate-cluster test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# on GPU hosts: faiss's GPU build in place of requirements.txt's faiss-cpu, the same version
setup-gpu: setup
	PIP="$(PY) -m pip" launch/install_faiss_gpu.sh

demo: setup
	$(PY) -m launch.demo

# the demo's CID student as a 2-node job on a local SLURM (root; apt-get install slurm-wlm munge), preempted at
# step 100 and requeued: it prints where it stopped and resumed (~8 min on 2 cores after make demo)
slurm-demo: demo
	$(PY) -m launch.slurm_demo

# the demo on the same images with web alt-text noise in the training captions (~15 min on 2 cores)
demo-web: setup
	$(PY) -m launch.demo --captions web --out runs/demo_web

# no teacher, instance-only, the CLIP-KD mix, the CLIP-CID mix at cluster weights 0.1/0.3/1.0, with FD, 3 seeds each,
# on clean and on web captions (mean ± std; ~65 min on 2 cores after both demos; the eval sets are the same)
ablate-captions: demo demo-web
	$(PY) -m launch.ablate ds_configs/ablations/captions.yaml --out runs/demo/ablate_captions
	$(PY) -m launch.ablate ds_configs/ablations/captions.yaml --out runs/demo_web/ablate_captions \
	    'data.train_shards=runs/demo_web/packed/*.tar' cluster.dir=runs/demo_web/clusters

# the cluster term's design space on web captions (ds_configs/ablations/cluster_design.yaml): the web demo's cache
# clustered at k = 32..256 with the 8 nearest centroids stored, the same balanced samples packed with each as the
# demo packs them, then 18 rows x 3 seeds (~70 min on 2 cores after demo-web)
ablate-cluster: demo-web
	for k in 32 64 128 256; do \
	    $(PY) -m data_tools.cluster --features runs/demo_web/feats --k $$k --topk 8 --out runs/demo_web/variants/k$$k && \
	    $(PY) -m data_tools.pack --shards 'runs/demo_web/data/train/*.tar' --features runs/demo_web/feats \
	        --tokenizer demo-student --clusters runs/demo_web/variants/k$$k --balance runs/demo_web/balance \
	        --ranks 1 --workers 16 --out runs/demo_web/variants/k$$k/packed || exit 1; \
	done
	$(PY) -m launch.ablate ds_configs/ablations/cluster_design.yaml --out runs/demo_web/ablate_cluster

# every CLIP-KD term alone, the CLIP-KD and CLIP-CID mixes and the baseline on the demo data (~25 min on 2 cores)
ablate: demo
	$(PY) -m launch.ablate ds_configs/ablations/demo.yaml --out runs/demo/ablate

# stored views replayed vs the student's own crops vs the eval view, one teacher vs two (~20 min after the demo, 2 cores)
ablate-views: setup
	$(PY) -m launch.demo --views 2 --teachers 2
	$(PY) -m launch.ablate ds_configs/ablations/views.yaml --out runs/demo/ablate_views

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -p no:cacheprovider --durations=20

# every bench script; bench/fast_paths.py runs inside bench/trainer_throughput.py, timing.py and workbench.py are helpers,
# gpu_bundle.py makes the wheels a lent GPU machine lacks (docs/throughput.md)
bench: setup
	for b in $(filter-out bench/fast_paths.py bench/timing.py bench/workbench.py bench/gpu_bundle.py,$(wildcard bench/*.py)); do \
	    echo "== $$b"; DS_ACCELERATOR=cpu $(PY) $$b || exit 1; done

clean:
	rm -rf runs/demo
