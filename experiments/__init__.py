"""Studies of the privacy / client-cost / quality trade-off (`collafuse experiment`)."""
