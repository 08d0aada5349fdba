"""Raw → curated: streaming ingest against the contract (quarantine, splits), the on-disk dedup index,
the demo data generator and the QA-to-relevance builder, and reading the curated splits back."""
