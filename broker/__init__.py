"""The broker: admission, quotas, leases, and the node gateway."""
