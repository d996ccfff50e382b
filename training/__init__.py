"""GRM model, losses, data and trainer. `grmserve.server` imports the model from here."""
