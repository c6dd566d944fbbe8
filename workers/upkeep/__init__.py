"""Upkeep of the worker fleet: job leases, the reaper of stranded jobs, scratch directories."""
