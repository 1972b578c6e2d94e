"""The lake: the storage protocol (local folder, S3), the raw layer's layout and sink,
checkpoints, and schema contracts applied on the way into raw."""
