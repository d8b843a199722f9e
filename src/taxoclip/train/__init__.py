"""Trainers: LiT (``lit.py``) and the pieces every trainer shares (``common.py``)."""
