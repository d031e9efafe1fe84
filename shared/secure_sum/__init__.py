"""The secure noisy sum: integer encoding, masking and the pieces both the device and the server halves use."""
