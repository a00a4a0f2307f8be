"""A throwaway SLURM cluster for tests/test_slurm.py (see cluster.py)."""
