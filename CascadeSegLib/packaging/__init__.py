"""Model packages: model.json + weights (sha256-checked), safe zip extraction, the catalog and
resumable, checksummed download/install."""
