"""Reports from run directories: works from the files runs write (Parquet, CSV, JSON), never re-runs."""
