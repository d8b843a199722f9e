"""Trainers: the one loop (``loop.py``) and each method on it (``lit.py``; catlip, finetune, vqa next)."""
