"""Entry point for the DeepSpeed launcher: ``deepspeed [launcher args] launch/train.py --config X.yaml [k=v ...]``."""
from cid_ds.train import process_main

if __name__ == "__main__":
    process_main()
