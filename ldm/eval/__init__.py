"""Evaluation of the bundled demo model (``python -m ldm.eval demo``)."""
