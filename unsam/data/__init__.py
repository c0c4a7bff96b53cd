"""Datasets (SA-1B pseudo labels, COCO), the training/test mapper, prompt sampling and ATS."""
