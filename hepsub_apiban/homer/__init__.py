"""The HOMER side: HEPSUB registration, the enrichment answer, the HOMER tab."""
