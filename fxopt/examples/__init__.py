"""Real models and data bundled with fxopt, so every command and test has something to optimize."""
