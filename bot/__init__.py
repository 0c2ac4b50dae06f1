"""Chat adapters (Discord, Slack) and the web gallery: parse, call core, send."""
