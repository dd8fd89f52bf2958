"""lineguard-ui: the line dashboard. Reads only the broker; shows verdicts, heatmaps, alarms, history and models."""
