"""Evaluators: FID (torch-fidelity) and top-1 (as timm's validate.py)."""
