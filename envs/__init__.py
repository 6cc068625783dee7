"""Gymnasium environments of dplightning (imported as ``dplightning.envs``)."""
