"""Image files in: ingest, decode, knee ROI, synthetic films, prepare (Ray Data), balance, augment, test-time views."""
