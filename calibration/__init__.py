"""Calibration data and statistics for the passes that need them."""
