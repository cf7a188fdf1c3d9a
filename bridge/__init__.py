"""The `bridge` command: composes the ingress, the workers, the ledger and the sandboxes."""
