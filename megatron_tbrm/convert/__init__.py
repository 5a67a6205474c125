"""Checkpoint conversion between Hugging Face folders and megatron-core checkpoints.

    megatron-tbrm-convert-hf-to-megatron --hf-dir DIR --out CKPT --tp N --pp M   (hf_to_megatron.py)
    megatron-tbrm-convert-megatron-to-hf --ckpt CKPT --out DIR                   (megatron_to_hf.py)

Both go through the one HF<->Megatron table (megatron_tbrm/hf_mapping.py) that the weight
sync uses; launch.py starts their TP x PP worker processes.
"""
