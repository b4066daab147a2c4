"""cid_ds: distil a large CLIP teacher into a small CLIP student with DeepSpeed (CLIP-CID, CLIP-KD)."""
__version__ = "0.2.0"
