"""Calibration data handling and streaming activation statistics."""
