"""Survival analysis: endpoints, Cox models with clinical and image covariates, c-index, Kaplan-Meier."""
