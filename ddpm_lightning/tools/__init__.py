"""Small command-line tools around the quickstart."""
