"""The campaign spec, the Prefect flows that drive the loop, the ledger, the safety gate and the CLI."""
