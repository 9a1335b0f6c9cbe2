"""Another hospital: out-of-distribution scores, the shift test and unlabelled BatchNorm adaptation."""
