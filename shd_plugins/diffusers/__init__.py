"""diffusers integration: DiT sampling and model folders."""
