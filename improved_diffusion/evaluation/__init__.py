"""Sampling images and measuring them: FID and the ADM metrics, the one evaluator."""
