"""Segflow's built-in provider plugins, registered in the ``segflow.providers`` group."""
