"""The source side: connections and error translation, slot and publication admin,
catalog look-ups, the heartbeat and the replication stream. Only this package (and the
snapshot readers) talks to PostgreSQL."""
