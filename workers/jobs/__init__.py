"""Job handlers: run.py (lease, dispatch by type, error table, finish), one module per job type."""
