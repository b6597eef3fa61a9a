"""Methods other than the cascade that run through the same public predictor interface."""
