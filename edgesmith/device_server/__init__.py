"""The device server: an OpenAI-compatible Flask app for a Raspberry Pi (see app.py)."""
