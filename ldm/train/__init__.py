"""Training code for the bundled demo model (``python -m ldm.train demo``)."""
