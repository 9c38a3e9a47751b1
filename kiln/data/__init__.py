"""Data sets shared by subsystems (calibration sets, small training sets)."""
