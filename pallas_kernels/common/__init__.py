"""What every operator shares: implementation dispatch, input validation, per-shard execution."""
