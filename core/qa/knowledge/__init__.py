"""The curated, sourced car facts (facts.jsonl) that retrieval grounds answers in."""
