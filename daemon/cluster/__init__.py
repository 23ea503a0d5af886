"""Many daemons sharing one camera list: NATS JetStream leases (docs/cluster.md)."""
