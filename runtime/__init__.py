"""What lives while a quantized model runs: packed weights, records for the report, artifacts."""
