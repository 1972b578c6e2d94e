"""The streaming pipeline: the session loop, the per-table batcher and the ack policy
(acknowledge only what is durable in raw and recorded in the checkpoint)."""
