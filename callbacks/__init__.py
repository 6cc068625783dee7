"""Lightning callbacks of dplightning (imported as ``dplightning.callbacks``)."""
