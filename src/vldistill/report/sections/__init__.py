"""The report's sections, one module per kind; each builds its `Section` from the runs, or None when no run
holds what it shows."""
