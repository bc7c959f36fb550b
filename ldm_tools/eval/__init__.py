"""Evaluation of the bundled demo model (``python -m ldm_tools.eval demo``)."""
