"""Entry point for the DeepSpeed launcher: ``deepspeed [launcher args] launch/train.py --config X.yaml [k=v ...]``."""
from cid_ds.faults import StopSignal

if __name__ == "__main__":
    stop = StopSignal()  # before the seconds of importing torch: a stop signal then must not kill the rank
    from cid_ds.train import process_main
    process_main(stop)
