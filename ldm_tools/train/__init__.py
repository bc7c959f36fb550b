"""Training code for the bundled demo model (``python -m ldm_tools.train demo``)."""
