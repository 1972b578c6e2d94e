"""History: SCD2 versions of every row from raw, beside the staged tables."""
