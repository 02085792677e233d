"""Audio in and out of the HTTP server: uploads to 16 kHz PCM, speech to files (PyAV)."""
